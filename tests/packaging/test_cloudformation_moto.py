"""Both templates deployed into moto's CloudFormation (moto_server on loopback), expanded for
their slots: the addresses stack's EIPs, health checks and records (for 1, 4 and 8 slots); a
fleet of an instance per slot, each tagged with a distinct allocation id; and a second fleet
taking over from the first.

moto does not apply everything a template says; what it drops is checked statically instead
(test_templates.py and the cfn-guard rules): security group rules with SourcePrefixListId,
CloudWatch alarms (not supported, skipped with a warning), and a group's
LifecycleHookSpecificationList and InstanceMaintenancePolicy (accepted and ignored; a test
below notices when moto starts applying them). It makes an AWS::EC2::EIP without its Tags,
which the proxies need, so fleet.deploy_addresses sets them from the template as CloudFormation
would. It cannot delete a route table made by a stack either, so the fleets that are deleted
here run in an existing VPC (the template's other mode), made by the test."""

import ast
import base64
import os
import subprocess
import tomllib
import urllib.request

import pytest
import yaml

import cfn_expand
import fleet
from conftest import tool
from imds import Imds

ADDRESSES = "static-addresses"


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with fleet.MotoServer(moto_server=tool("moto_server"), log_path=log) as server:
        yield server


@pytest.fixture
def aws(moto):
    # Every test starts from an empty account.
    req = urllib.request.Request(moto.url + "/moto-api/reset", method="POST")
    with urllib.request.urlopen(req, timeout=10):
        pass
    return moto.clients()


@pytest.fixture(scope="module")
def static_ingress(deb_path, tmp_path_factory):
    """The binary from the .deb, as the fleet's instances run it."""
    root = tmp_path_factory.mktemp("deb")
    subprocess.run(["dpkg-deb", "-x", str(deb_path), str(root)], check=True)
    return str(root / "usr/bin/static-ingress")


def claim_eip(static_ingress, moto, instance, expect=0):
    """`static-ingress claim-eip` as `instance` runs it at boot: its id and tags from
    (stand-in) instance metadata, EC2 from moto. Checks its exit code; returns the report it
    prints."""
    env = {"PATH": os.environ.get("PATH", ""), "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing"}
    with Imds(instance["id"], instance["tags"]) as imds:
        r = subprocess.run(
            [static_ingress, "claim-eip", "--config", "/dev/null",
             "--eip-imds-endpoint", imds.url, "--eip-ec2-endpoint", moto.url],
            env=env, capture_output=True, text=True, timeout=120, check=False)
        assert imds.unauthorized == 0, "a metadata read came without an IMDSv2 token"
    assert r.returncode == expect, r.stderr
    return r.stdout


def allocation_ids(out, n=4):
    return [out[f"AllocationId{k}"] for k in range(1, n + 1)]


@pytest.mark.parametrize("n", [1, 4, 8])
def test_addresses_stack_makes_a_checked_weighted_address_per_slot(aws, n):
    out = fleet.deploy_addresses(aws, ADDRESSES, slots=cfn_expand.slots(n))

    assert out["Slots"] == ",".join(cfn_expand.slots(n))
    ids = allocation_ids(out, n)
    assert len(set(ids)) == n
    eips = fleet.addresses(aws, ids)
    assert sorted(eips) == sorted(ids)
    ips = [eips[i]["PublicIp"] for i in ids]
    assert [out[f"PublicIp{k}"] for k in range(1, n + 1)] == ips

    r53 = aws["route53"]
    checks = {c["Id"]: c["HealthCheckConfig"] for c in r53.list_health_checks()["HealthChecks"]}
    assert len(checks) == n
    assert {out[f"HealthCheckId{k}"]: out[f"PublicIp{k}"] for k in range(1, n + 1)} == {
        i: c["IPAddress"] for i, c in checks.items()}, "each slot's check is its own address's"
    zone = fleet.hosted_zone(aws)
    records = [r for r in r53.list_resource_record_sets(HostedZoneId=zone)["ResourceRecordSets"]
               if r["Type"] == "A"]
    assert len(records) == n
    seen_ips = set()
    for rec in records:
        assert rec["Name"].rstrip(".") == fleet.RECORD_NAME
        assert rec["Weight"] == 10 and rec["TTL"] == 60
        [value] = [v["Value"] for v in rec["ResourceRecords"]]
        check = checks[rec["HealthCheckId"]]
        # Each record is guarded by the check of its own address.
        assert check["IPAddress"] == value
        assert (check["Type"], check["Port"], check["ResourcePath"]) == ("HTTP", 9001, "/health")
        seen_ips.add(value)
    assert seen_ips == set(ips)


def test_each_address_carries_its_address_set_and_the_slot_of_its_export(aws):
    out = fleet.deploy_addresses(aws, ADDRESSES)
    other = fleet.deploy_addresses(aws, "other-addresses")

    # What a proxy reads: DescribeAddresses filtered on the address set finds the four addresses
    # of its own stack (not another stack's), each in the slot of the export its group claims.
    found = aws["ec2"].describe_addresses(
        Filters=[{"Name": f"tag:{fleet.ADDRESS_SET_TAG}", "Values": [ADDRESSES]}])["Addresses"]
    slots = {a["AllocationId"]: {t["Key"]: t["Value"] for t in a["Tags"]}[fleet.SLOT_TAG] for a in found}
    assert slots == {out[f"AllocationId{n}"]: str(n) for n in range(1, 5)}
    assert not set(slots) & set(allocation_ids(other))
    for tags in fleet.addresses(aws, allocation_ids(out)).values():
        assert tags["Tags"][fleet.MANAGED_TAG] == "true"
        assert tags["Tags"][fleet.ADDRESS_SET_TAG] == ADDRESSES


@pytest.mark.parametrize("n", [1, 4, 8])
def test_fleet_gives_an_instance_per_slot_each_tagged_with_a_distinct_allocation(aws, n):
    slots = cfn_expand.slots(n)
    addresses = fleet.deploy_addresses(aws, ADDRESSES, slots=slots)
    fleet.deploy_fleet(aws, "static-fleet-1", ADDRESSES, slots=slots)

    insts = fleet.instances(aws, "static-fleet-1")
    assert len(insts) == n
    assert all(i["state"] == "running" for i in insts)
    # In slot order: group N's instance carries allocation N.
    assert [i["allocation_id"] for i in insts] == allocation_ids(addresses, n)
    # Odd slots in one AZ, even slots in another.
    azs = [i["az"] for i in insts]
    odd, even = set(azs[0::2]), set(azs[1::2])
    assert len(odd) == 1 and len(even) == min(1, n - 1) and not odd & even, azs

    for g in fleet.groups(aws, "static-fleet-1"):
        assert (g["MinSize"], g["MaxSize"], g["DesiredCapacity"]) == (1, 1, 1)
        for key in (fleet.ALLOCATION_TAG, fleet.GENERATION_TAG):
            [tag] = [t for t in g["Tags"] if t["Key"] == key]
            assert tag["PropagateAtLaunch"] is True


def test_each_instance_carries_its_fleets_generation(aws):
    fleet.deploy_addresses(aws, ADDRESSES)
    fleet.deploy_fleet(aws, "static-fleet-1", ADDRESSES, generation=20261205113000)

    # The claim compares it first: an old fleet's replacement never takes an address back.
    assert [i["generation"] for i in fleet.instances(aws, "static-fleet-1")] == ["20261205113000"] * 4


def test_launch_template_requires_imdsv2_and_passes_the_backend(aws):
    fleet.deploy_addresses(aws, ADDRESSES)
    fleet.deploy_fleet(aws, "static-fleet-1", ADDRESSES, backend="blue-green.example.net:8443",
                       HandoffsAtOnce=2)

    ec2 = aws["ec2"]
    [inst] = fleet.instances(aws, "static-fleet-1")[:1]
    lt_id = inst["tags"]["aws:ec2launchtemplate:id"]
    data = ec2.describe_launch_template_versions(LaunchTemplateId=lt_id)["LaunchTemplateVersions"][0][
        "LaunchTemplateData"]
    assert data["MetadataOptions"] == {
        "HttpEndpoint": "enabled", "HttpTokens": "required", "HttpPutResponseHopLimit": 1,
        "InstanceMetadataTags": "enabled",
    }
    user_data = base64.b64decode(data["UserData"]).decode()
    assert user_data.startswith("#cloud-config\n")
    [drop_in] = [f for f in yaml.safe_load(user_data)["write_files"]
                 if f["path"] == "/etc/static-ingress/static-ingress.toml.d/50-launch-template.toml"]
    # The drop-in is TOML the proxy reads, with the stack's values in place.
    settings = tomllib.loads(drop_in["content"])
    assert settings == {"backend": {"address": "blue-green.example.net:8443"},
                        "admin": {"listen": "0.0.0.0:9001", "operator_listen": ["0.0.0.0:9002"]},
                        "eip": {"handoffs_at_once": 2}}, settings


def _proxy_group(aws, stack):
    groups = aws["ec2"].describe_security_groups(Filters=[{"Name": "tag:Name", "Values": [stack]}])["SecurityGroups"]
    [group] = [g for g in groups if g["GroupName"] != "default"]
    return group


def _sources(group, port):
    """Who may reach `port`: CIDRs, prefix lists and security groups."""
    found = []
    for perm in group["IpPermissions"]:
        if perm.get("FromPort") == port:
            found += [r["CidrIp"] for r in perm.get("IpRanges", [])]
            found += [r["PrefixListId"] for r in perm.get("PrefixListIds", [])]
            found += [r["GroupId"] for r in perm.get("UserIdGroupPairs", [])]
    return sorted(found)


def test_the_operator_port_admits_the_monitoring_source_only(aws):
    fleet.deploy_addresses(aws, ADDRESSES)
    # None given: nothing reaches the operator port from outside the instance.
    fleet.deploy_fleet(aws, "static-fleet-1", ADDRESSES)
    assert _sources(_proxy_group(aws, "static-fleet-1"), 9002) == []
    # A security group (Prometheus's, say), on a port of the operator's choosing.
    ec2 = aws["ec2"]
    vpc = ec2.describe_vpcs()["Vpcs"][0]["VpcId"]
    prometheus = ec2.create_security_group(GroupName="prometheus", Description="scrapers", VpcId=vpc)["GroupId"]
    fleet.deploy_fleet(aws, "static-fleet-2", ADDRESSES, MonitoringSource=prometheus, OperatorPort=9102)
    group = _proxy_group(aws, "static-fleet-2")
    assert _sources(group, 9102) == [prometheus]
    # (moto leaves out an inline rule whose only source is a prefix list, so the health port's
    # source, Route 53's prefix list alone, is checked by cfn-guard in test_templates.py.)
    assert _sources(group, 443) == ["0.0.0.0/0"]


def test_one_handoff_at_a_time_by_default(aws):
    fleet.deploy_addresses(aws, ADDRESSES)
    fleet.deploy_fleet(aws, "static-fleet-1", ADDRESSES)

    [inst] = fleet.instances(aws, "static-fleet-1")[:1]
    data = aws["ec2"].describe_launch_template_versions(
        LaunchTemplateId=inst["tags"]["aws:ec2launchtemplate:id"])["LaunchTemplateVersions"][0]["LaunchTemplateData"]
    [drop_in] = [f for f in yaml.safe_load(base64.b64decode(data["UserData"]).decode())["write_files"]
                 if f["path"].endswith("/50-launch-template.toml")]
    assert tomllib.loads(drop_in["content"])["eip"] == {"handoffs_at_once": 1}


def test_every_group_carries_its_fleet_tag_and_moto_ignores_hooks_and_maintenance(aws):
    fleet.deploy_addresses(aws, ADDRESSES)
    fleet.deploy_fleet(aws, "static-fleet-1", ADDRESSES)
    fleet.deploy_fleet(aws, "static-fleet-2", ADDRESSES, generation=2)

    asg = aws["autoscaling"]
    for stack in ("static-fleet-1", "static-fleet-2"):
        groups = fleet.groups(aws, stack)
        assert len(groups) == 4
        for g in groups:
            # The role may complete lifecycle actions and set instance health only in groups
            # whose static-ingress:fleet tag is its own stack's name.
            [tag] = [t for t in g["Tags"] if t["Key"] == fleet.FLEET_TAG]
            assert tag["Value"] == stack
            # moto accepts LifecycleHookSpecificationList and InstanceMaintenancePolicy and
            # applies neither (moto 5.2), so the templates' checks (test_templates.py, cfn-guard)
            # are what hold them. When this fails, moto applies them: check them here instead.
            assert asg.describe_lifecycle_hooks(AutoScalingGroupName=g["AutoScalingGroupName"])[
                "LifecycleHooks"] == [], "moto now applies lifecycle hooks: check them here"
            assert "InstanceMaintenancePolicy" not in g, "moto now applies the maintenance policy"


def test_instance_role_has_exactly_the_documented_policy(aws):
    fleet.deploy_addresses(aws, ADDRESSES)
    out = fleet.deploy_fleet(aws, "static-fleet-1", ADDRESSES)

    iam = aws["iam"]
    role = out["InstanceRoleArn"].split("/")[-1]
    assert iam.list_role_policies(RoleName=role)["PolicyNames"] == ["static-ingress-eip"]
    assert iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"] == []
    doc = iam.get_role_policy(RoleName=role, PolicyName="static-ingress-eip")["PolicyDocument"]
    if isinstance(doc, str):
        # moto returns a policy made by CloudFormation as the repr of a Python dict.
        doc = ast.literal_eval(doc)
    assert doc == fleet.policy_file()
    # The policy's Auto Scaling statement compares a group's static-ingress:fleet tag with the
    # role's own (aws:PrincipalTag): the role carries its stack's name, as the groups do.
    tags = {t["Key"]: t["Value"] for t in iam.list_role_tags(RoleName=role)["Tags"]}
    assert tags[fleet.FLEET_TAG] == "static-fleet-1"


def test_only_443_is_open_to_the_world(aws):
    fleet.deploy_addresses(aws, ADDRESSES)
    out = fleet.deploy_fleet(aws, "static-fleet-1", ADDRESSES)

    [sg] = aws["ec2"].describe_security_groups(GroupIds=[out["SecurityGroupId"]])["SecurityGroups"]
    world = [p for p in sg["IpPermissions"]
             if any(r["CidrIp"] == "0.0.0.0/0" for r in p.get("IpRanges", []))]
    assert [(p["FromPort"], p["ToPort"]) for p in world] == [(443, 443)]


def _existing_network(aws):
    """A VPC with two public subnets in two AZs, as an operator's existing network."""
    ec2 = aws["ec2"]
    vpc = ec2.create_vpc(CidrBlock="10.7.0.0/16")["Vpc"]["VpcId"]
    a = ec2.create_subnet(VpcId=vpc, CidrBlock="10.7.0.0/24", AvailabilityZone="us-east-1a")
    b = ec2.create_subnet(VpcId=vpc, CidrBlock="10.7.1.0/24", AvailabilityZone="us-east-1b")
    return vpc, a["Subnet"]["SubnetId"], b["Subnet"]["SubnetId"]


def test_a_second_fleet_takes_over_and_the_first_is_deleted(aws, moto, static_ingress):
    addresses = fleet.deploy_addresses(aws, ADDRESSES)
    ids = allocation_ids(addresses)
    vpc, subnet_a, subnet_b = _existing_network(aws)
    network = {"VpcId": vpc, "SubnetIdA": subnet_a, "SubnetIdB": subnet_b}
    out = fleet.deploy_fleet(aws, "static-fleet-1", ADDRESSES, generation=1, **network)
    assert out["VpcId"] == vpc
    first = fleet.instances(aws, "static-fleet-1")
    assert [i["allocation_id"] for i in first] == ids
    assert [i["subnet"] for i in first] == [subnet_a, subnet_b, subnet_a, subnet_b]
    # Each instance claims the address its group tagged it with, as it does at boot.
    for inst in first:
        report = claim_eip(static_ingress, moto, inst)
        assert "result:     associated" in report, report
    eips = fleet.addresses(aws, ids)
    assert [eips[i].get("InstanceId") for i in ids] == [i["id"] for i in first]

    # The next release: a new fleet, of a later generation, naming the same four addresses.
    fleet.deploy_fleet(aws, "static-fleet-2", ADDRESSES, generation=2, **network)
    second = fleet.instances(aws, "static-fleet-2")
    assert [i["allocation_id"] for i in second] == ids
    assert not {i["id"] for i in first} & {i["id"] for i in second}
    # The new fleet's instances boot and take all four addresses from the old ones.
    for old, new in zip(first, second):
        report = claim_eip(static_ingress, moto, new)
        assert f"result:     associated, taking it from {old['id']}" in report, report
    eips = fleet.addresses(aws, ids)
    assert [eips[i].get("InstanceId") for i in ids] == [i["id"] for i in second]
    # An old instance's proxy restarting now does not take its address back.
    for old in first:
        assert claim_eip(static_ingress, moto, old, expect=15) == ""
    eips = fleet.addresses(aws, ids)
    assert [eips[i].get("InstanceId") for i in ids] == [i["id"] for i in second]

    fleet.delete_stack(aws, "static-fleet-1")
    found = aws["ec2"].describe_instances(InstanceIds=[i["id"] for i in first])["Reservations"]
    states = {i["InstanceId"]: i["State"]["Name"] for r in found for i in r["Instances"]}
    assert set(states.values()) <= {"shutting-down", "terminated"}, states
    assert [i["allocation_id"] for i in fleet.instances(aws, "static-fleet-2")] == ids
    # The addresses outlive every fleet.
    assert sorted(fleet.addresses(aws, ids)) == sorted(ids)


def test_addresses_are_kept_when_their_stack_is_deleted(aws):
    ids = allocation_ids(fleet.deploy_addresses(aws, ADDRESSES))
    fleet.delete_stack(aws, ADDRESSES)
    assert sorted(fleet.addresses(aws, ids)) == sorted(ids)
