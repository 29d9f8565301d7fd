# Packer recipe for the static-ingress AMI: a current Debian base, the static-ingress .deb, the
# kernel settings in 60-static-ingress.conf, and the unit enabled so that every instance
# launched from the AMI starts the proxy at boot (the launch template supplies the backend).
#
#   make deb          # prints the path of the .deb it built
#   packer init ami/  # current Packer: fetches the amazon plugin named in plugins.pkr.hcl
#   packer build -var deb=<path of the .deb> ami/
#
# This file is kept valid for Debian's packer 1.6 too, which the tests use (make package-test);
# ami/README.md says what that old packer cannot check.

variable "deb" {
  type        = string
  description = "Path of the static-ingress .deb to install (from make deb)."
}

variable "region" {
  type        = string
  description = "Region to build in; copy the AMI to others if needed."
  default     = "us-east-1"
}

variable "instance_type" {
  type        = string
  description = "Instance type of the temporary build instance (x86_64, like the .deb)."
  default     = "t3.small"
}

variable "debian_release" {
  type        = string
  description = "Debian release of the base image (13 is trixie)."
  default     = "13"
}

variable "ami_name_prefix" {
  type    = string
  default = "static-ingress"
}

locals {
  # AMI names must be unique per account and region.
  timestamp = formatdate("YYYYMMDD-hhmmss", timestamp())
}

source "amazon-ebs" "static-ingress" {
  region          = var.region
  instance_type   = var.instance_type
  ami_name        = "${var.ami_name_prefix}-${local.timestamp}"
  ami_description = "static-ingress TCP passthrough proxy on Debian ${var.debian_release}"

  # Debian's official cloud images, published by the Debian cloud team's account.
  source_ami_filter {
    filters = {
      name                = "debian-${var.debian_release}-amd64-*"
      architecture        = "x86_64"
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    owners      = ["136693071363"]
    most_recent = true
  }

  ssh_username = "admin"


  tags = {
    Name                    = "${var.ami_name_prefix}-${local.timestamp}"
    "static-ingress:debian" = var.debian_release
  }
}

build {
  sources = ["source.amazon-ebs.static-ingress"]

  provisioner "file" {
    source      = var.deb
    destination = "/tmp/static-ingress.deb"
  }

  provisioner "file" {
    source      = "${path.root}/60-static-ingress.conf"
    destination = "/tmp/60-static-ingress.conf"
  }

  provisioner "shell" {
    script          = "${path.root}/provision.sh"
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
  }
}
