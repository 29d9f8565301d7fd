# Current Packer (>= 1.7) no longer bundles the amazon builder: `packer init ami/` fetches it.
# Debian's packer 1.6 does not know this block, so its checks validate static-ingress.pkr.hcl
# alone (see README.md here).
packer {
  required_version = ">= 1.7.0"
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.3.0"
    }
  }
}
