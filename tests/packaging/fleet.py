"""Deploys the CloudFormation templates into moto (an AWS emulator on loopback) and reads back
what they made. moto knows no transforms, so each template goes in expanded for its slots
(cfn_expand: one resource per slot, as CloudFormation's AWS::LanguageExtensions makes them).
The steps are functions so that a test can put its own between them, e.g. run
`static-ingress claim-eip` for each instance after deploy_fleet().

    with MotoServer() as moto:
        aws = moto.clients()
        addresses = deploy_addresses(aws, "static-addresses")
        deploy_fleet(aws, "static-fleet-1", "static-addresses")
        for inst in instances(aws, "static-fleet-1"): ...
"""

import json
import pathlib
import subprocess
import time
import urllib.request

import boto3

import cfn_expand
from ports import free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "cloudformation"
REGION = "us-east-1"
ALLOCATION_TAG = "static-ingress:eip-allocation-id"
GENERATION_TAG = "static-ingress:fleet-generation"
FLEET_TAG = "static-ingress:fleet"
MANAGED_TAG = "static-ingress:managed"
ADDRESS_SET_TAG = "static-ingress:address-set"
SLOT_TAG = "static-ingress:slot"
RECORD_NAME = "static.example.com"
# Where moto's server writes its log; read when a test fails.
START_TIMEOUT_S = 30


class MotoServer:
    """moto_server on 127.0.0.1 and a free port (or the host and port given: the lab runs it on
    its own address in a namespace of its own), started and stopped by its PID."""

    def __init__(self, moto_server="moto_server", log_path=None, host="127.0.0.1", port=None):
        self.moto_server = moto_server
        self.log_path = log_path
        self.proc = None
        self.host = host
        self.port = port

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    def __enter__(self):
        if self.port is None:
            self.port = free_port()
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [self.moto_server, "-H", self.host, "-p", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(self.url + "/moto-api/", timeout=2):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"moto_server exited with {self.proc.returncode}")
                if time.monotonic() > deadline:
                    self.__exit__(None, None, None)
                    raise RuntimeError(f"moto_server did not answer on {self.url} within {START_TIMEOUT_S}s")
                time.sleep(0.2)

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def clients(self):
        """boto3 clients for the services the templates use, all pointed at this server."""
        session = boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
        )
        names = ["cloudformation", "ec2", "autoscaling", "iam", "route53"]
        return {n: session.client(n, endpoint_url=self.url) for n in names}


def _deploy(aws, stack, template, params, slots):
    cfn = aws["cloudformation"]
    params = {**params, "Slots": ",".join(slots)}
    cfn.create_stack(
        StackName=stack,
        TemplateBody=json.dumps(cfn_expand.expand(template, slots)),
        Parameters=[{"ParameterKey": k, "ParameterValue": str(v)} for k, v in params.items()],
        Capabilities=["CAPABILITY_IAM"],
    )
    cfn.get_waiter("stack_create_complete").wait(
        StackName=stack, WaiterConfig={"Delay": 1, "MaxAttempts": 60}
    )
    return outputs(aws, stack)


def outputs(aws, stack):
    """The stack's outputs as a dict."""
    desc = aws["cloudformation"].describe_stacks(StackName=stack)["Stacks"][0]
    return {o["OutputKey"]: o["OutputValue"] for o in desc.get("Outputs", [])}


def hosted_zone(aws, name="example.com."):
    """The id (without /hostedzone/) of a public hosted zone, made if missing."""
    r53 = aws["route53"]
    for zone in r53.list_hosted_zones()["HostedZones"]:
        if zone["Name"] == name:
            return zone["Id"].split("/")[-1]
    zone = r53.create_hosted_zone(Name=name, CallerReference=str(time.time()))["HostedZone"]
    return zone["Id"].split("/")[-1]


def deploy_addresses(aws, stack, slots=cfn_expand.DEFAULT_SLOTS, **params):
    """Creates the addresses stack with an address per slot and tags its Elastic IPs as the
    template says (see tag_addresses_as_the_template_says); returns its outputs."""
    params = {"HostedZoneId": hosted_zone(aws), "RecordName": RECORD_NAME, **params}
    out = _deploy(aws, stack, "addresses.yaml", params, slots)
    tag_addresses_as_the_template_says(aws, stack, slots)
    return out


def _resolve(value, stack):
    """A tag value of the addresses template: a string, or the stack's name by !Ref or !Sub.
    Anything else is refused, so that a template change this stand-in cannot follow fails here
    instead of tagging an address with the wrong value."""
    pseudo = {"AWS::StackName": stack, "AWS::Region": REGION}
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and list(value) == ["Ref"] and value["Ref"] in pseudo:
        return pseudo[value["Ref"]]
    if isinstance(value, dict) and list(value) == ["Fn::Sub"] and isinstance(value["Fn::Sub"], str):
        out = value["Fn::Sub"]
        for name, v in pseudo.items():
            out = out.replace("${" + name + "}", v)
        if "${" not in out:
            return out
    raise ValueError(f"cannot resolve the tag value {value!r} of the addresses template")


def tag_addresses_as_the_template_says(aws, stack, slots=cfn_expand.DEFAULT_SLOTS):
    """moto's CloudFormation makes an AWS::EC2::EIP without its Tags (moto 5: "TODO: support
    tags from cloudformation template"), and the proxies need them: static-ingress:managed for
    the IAM policy, static-ingress:address-set and static-ingress:slot for the handoff. So this
    reads each EIP's Tags from cloudformation/addresses.yaml (expanded for `slots`), resolves the
    stack's name in them,
    and sets them with CreateTags on the address the stack made for that resource, as
    CloudFormation would. Returns allocation id -> the tags set."""
    template = cfn_expand.expand("addresses.yaml", slots)
    made = aws["cloudformation"].describe_stack_resources(StackName=stack)["StackResources"]
    # The physical id of an EIP is its public IP (what its Ref gives). (moto also lists the
    # alarms it skipped, without a logical id.)
    physical = {r["LogicalResourceId"]: r["PhysicalResourceId"] for r in made
                if r.get("ResourceType") == "AWS::EC2::EIP"}
    ec2 = aws["ec2"]
    result = {}
    for name, resource in template["Resources"].items():
        if resource["Type"] != "AWS::EC2::EIP":
            continue
        tags = [{"Key": t["Key"], "Value": _resolve(t["Value"], stack)}
                for t in resource.get("Properties", {}).get("Tags", [])]
        [address] = ec2.describe_addresses(PublicIps=[physical[name]])["Addresses"]
        if tags:
            ec2.create_tags(Resources=[address["AllocationId"]], Tags=tags)
        result[address["AllocationId"]] = {t["Key"]: t["Value"] for t in tags}
    return result


def health_checker_prefix_list(aws):
    """The Route 53 health-checker prefix list. moto has no such AWS-managed list, so a
    customer-managed one of the same name stands in for it."""
    ec2 = aws["ec2"]
    name = f"com.amazonaws.{REGION}.route53-healthchecks"
    found = ec2.describe_managed_prefix_lists(Filters=[{"Name": "prefix-list-name", "Values": [name]}])
    if found["PrefixLists"]:
        return found["PrefixLists"][0]["PrefixListId"]
    made = ec2.create_managed_prefix_list(
        PrefixListName=name, AddressFamily="IPv4", MaxEntries=32,
        Entries=[{"Cidr": "54.243.31.192/26"}],
    )
    return made["PrefixList"]["PrefixListId"]


def image_id(aws):
    """Any x86_64 image moto knows, standing in for the static-ingress AMI."""
    images = aws["ec2"].describe_images(Owners=["amazon"])["Images"]
    return next(i["ImageId"] for i in images if i.get("Architecture") == "x86_64")


def deploy_fleet(aws, stack, addresses_stack, backend="api.example.com:443", generation=1,
                 slots=cfn_expand.DEFAULT_SLOTS, **params):
    """Creates a fleet stack claiming the addresses of `addresses_stack` (a group per slot), of
    fleet generation `generation`; returns its outputs."""
    params = {
        "AddressesStackName": addresses_stack,
        "FleetGeneration": generation,
        "BackendAddress": backend,
        "ImageId": image_id(aws),
        "HealthCheckerPrefixListId": health_checker_prefix_list(aws),
        **params,
    }
    return _deploy(aws, stack, "fleet.yaml", params, slots)


def delete_stack(aws, stack):
    cfn = aws["cloudformation"]
    cfn.delete_stack(StackName=stack)
    cfn.get_waiter("stack_delete_complete").wait(
        StackName=stack, WaiterConfig={"Delay": 1, "MaxAttempts": 60}
    )


def groups(aws, stack):
    """The Auto Scaling groups of a fleet stack, in slot order (its AutoScalingGroup<slot>
    outputs)."""
    out = outputs(aws, stack)
    prefix = "AutoScalingGroup"
    slots = sorted(int(k.removeprefix(prefix)) for k in out if k.startswith(prefix))
    names = [out[f"{prefix}{n}"] for n in slots]
    found = aws["autoscaling"].describe_auto_scaling_groups(AutoScalingGroupNames=names)
    by_name = {g["AutoScalingGroupName"]: g for g in found["AutoScalingGroups"]}
    return [by_name[n] for n in names]


def instances(aws, stack):
    """The running instances of a fleet stack, one dict per instance, in group order: id,
    group, subnet, availability zone, tags (a dict), the allocation id it must claim, its fleet
    generation, and the public IP it has now."""
    ec2 = aws["ec2"]
    result = []
    for group in groups(aws, stack):
        ids = [i["InstanceId"] for i in group["Instances"]]
        if not ids:
            continue
        for res in ec2.describe_instances(InstanceIds=ids)["Reservations"]:
            for inst in res["Instances"]:
                tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
                result.append({
                    "id": inst["InstanceId"],
                    "group": group["AutoScalingGroupName"],
                    "state": inst["State"]["Name"],
                    "subnet": inst.get("SubnetId"),
                    "az": inst["Placement"]["AvailabilityZone"],
                    "tags": tags,
                    "allocation_id": tags.get(ALLOCATION_TAG),
                    "generation": tags.get(GENERATION_TAG),
                    "public_ip": inst.get("PublicIpAddress"),
                })
    return result


def addresses(aws, allocation_ids):
    """EC2's view of the given Elastic IPs: allocation id -> address record (with Tags as a
    dict and InstanceId when associated)."""
    found = aws["ec2"].describe_addresses(AllocationIds=list(allocation_ids))["Addresses"]
    out = {}
    for a in found:
        a = dict(a)
        a["Tags"] = {t["Key"]: t["Value"] for t in a.get("Tags", [])}
        out[a["AllocationId"]] = a
    return out


def policy_file():
    return json.loads((ROOT / "docs" / "iam-policy.json").read_text())
