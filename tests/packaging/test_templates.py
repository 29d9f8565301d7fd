"""The CloudFormation templates, checked without deploying them: cfn-lint, the cfn-guard rules
(passing on the templates and failing on broken copies), every per-address resource present and
linked to its own slot for 1, 4 and 8 addresses, and the instance role's policy being exactly
docs/iam-policy.json. cfn-lint expands the templates' Fn::ForEach loops itself; cfn-guard and
the structural checks read them expanded by cfn_expand, as CloudFormation runs them."""

import copy
import json
import pathlib
import re
import subprocess
import tomllib

import pytest
import yaml

import cfn_expand
import cfn_yaml
from conftest import ROOT, tool

TEMPLATES = ["cloudformation/addresses.yaml", "cloudformation/fleet.yaml"]
# The templates deploy in any region; lint them against a spread of regions' resource specs.
LINT_REGIONS = ["us-east-1", "us-west-2", "eu-west-1", "eu-central-1", "ap-southeast-2"]
RULES = ROOT / "cloudformation" / "rules.guard"
# How many addresses the templates are checked for: one, the default four, and eight.
COUNTS = [1, 4, 8]
DEFAULT_SLOTS = '    Default: "1,2,3,4"\n'


@pytest.mark.parametrize("n", COUNTS)
@pytest.mark.parametrize("template", TEMPLATES)
def test_cfn_lint_reports_nothing(template, n, tmp_path):
    # cfn-lint expands Fn::ForEach over the Slots parameter's default: a copy defaults to n slots.
    text = (ROOT / template).read_text()
    assert text.count(DEFAULT_SLOTS) == 1, "the Slots parameter's default is not where the test expects"
    copy_path = tmp_path / pathlib.PurePath(template).name
    copy_path.write_text(text.replace(DEFAULT_SLOTS, f'    Default: "{",".join(cfn_expand.slots(n))}"\n'))
    # Any error, warning or informational finding is printed and fails the test.
    r = subprocess.run([tool("cfn-lint"), "--format", "parseable", "--regions", *LINT_REGIONS, "--", str(copy_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.stdout == "" and r.returncode == 0, r.stdout + r.stderr


def _per_slot(resources, prefix):
    """The slots of the resources named prefix<slot>, as numbers, in order."""
    return sorted(int(k.removeprefix(prefix)) for k in resources if re.fullmatch(rf"{prefix}\d+", k))


@pytest.mark.parametrize("template", TEMPLATES)
def test_slots_are_checked_before_anything_is_made(template):
    # A slot outside the fleet's SlotZones mapping, or written "01", would make an address the
    # stack keeps (retained) and a fleet that fails later: the stack refuses it first.
    t = cfn_yaml.load(ROOT / template)
    [assertion] = t["Rules"]["SlotsAreKnown"]["Assertions"]
    checked, allowed = assertion["Assert"]["Fn::EachMemberIn"]
    assert checked == {"Ref": "Slots"}
    assert allowed == [str(k) for k in range(1, 17)]
    fleet = cfn_yaml.load(ROOT / "cloudformation/fleet.yaml")
    assert sorted(fleet["Mappings"]["SlotZones"], key=int) == allowed


@pytest.mark.parametrize("n", COUNTS)
def test_every_address_has_its_resources_each_linked_to_its_own_slot(n):
    t = cfn_expand.expand("addresses.yaml", cfn_expand.slots(n))
    res, out = t["Resources"], t["Outputs"]
    every = list(range(1, n + 1))
    for prefix in ("Eip", "HealthCheck", "Record", "HealthAlarm"):
        assert _per_slot(res, prefix) == every, prefix
    for prefix in ("PublicIp", "HealthCheckId", "AllocationId"):
        assert _per_slot(out, prefix) == every, prefix
    assert len(res) == 4 * n, sorted(res)
    for k in every:
        eip, check = f"Eip{k}", f"HealthCheck{k}"
        assert res[eip]["DeletionPolicy"] == res[eip]["UpdateReplacePolicy"] == "Retain"
        tags = {tag["Key"]: tag["Value"] for tag in res[eip]["Properties"]["Tags"]}
        assert tags["static-ingress:slot"] == str(k)
        assert res[check]["Properties"]["HealthCheckConfig"]["IPAddress"] == {"Ref": eip}
        record = res[f"Record{k}"]["Properties"]
        assert record["ResourceRecords"] == [{"Ref": eip}]
        assert record["HealthCheckId"] == {"Ref": check}
        assert record["SetIdentifier"] == {"Fn::Sub": f"${{AWS::StackName}}-{k}"}
        alarm = res[f"HealthAlarm{k}"]["Properties"]
        assert alarm["Dimensions"] == [{"Name": "HealthCheckId", "Value": {"Ref": check}}]
        assert {"Ref": eip} in alarm["AlarmDescription"]["Fn::Join"][1]
        assert out[f"PublicIp{k}"]["Value"] == {"Ref": eip}
        assert out[f"HealthCheckId{k}"]["Value"] == {"Ref": check}
        assert out[f"AllocationId{k}"]["Export"]["Name"] == {"Fn::Sub": f"${{AWS::StackName}}-AllocationId{k}"}


@pytest.mark.parametrize("n", COUNTS)
def test_every_slot_has_a_group_claiming_its_address_in_alternating_zones(n):
    t = cfn_expand.expand("fleet.yaml", cfn_expand.slots(n))
    res, out = t["Resources"], t["Outputs"]
    every = list(range(1, n + 1))
    for prefix in ("ProxyGroup", "NetworkOutHighAlarm", "NetworkOutLowAlarm", "StatusCheckAlarm"):
        assert _per_slot(res, prefix) == every, prefix
    assert _per_slot(out, "AutoScalingGroup") == every
    subnets = [{"Fn::If": ["CreateNetwork", {"Ref": "PublicSubnetA"}, {"Ref": "SubnetIdA"}]},
               {"Fn::If": ["CreateNetwork", {"Ref": "PublicSubnetB"}, {"Ref": "SubnetIdB"}]}]
    for k in every:
        group = f"ProxyGroup{k}"
        props = res[group]["Properties"]
        tags = {tag["Key"]: tag["Value"] for tag in props["Tags"]}
        assert tags["static-ingress:eip-allocation-id"] == {"Fn::ImportValue": {"Fn::Sub": [
            f"${{Addresses}}-AllocationId{k}", {"Addresses": {"Ref": "AddressesStackName"}}]}}
        assert tags["Name"] == {"Fn::Sub": f"${{AWS::StackName}}-{k}"}
        # Odd slots in the first subnet, even in the second.
        assert props["VPCZoneIdentifier"] == [{"Fn::Select": [(k + 1) % 2, subnets]}]
        for alarm in ("NetworkOutHighAlarm", "NetworkOutLowAlarm", "StatusCheckAlarm"):
            dims = res[f"{alarm}{k}"]["Properties"]["Dimensions"]
            assert dims == [{"Name": "AutoScalingGroupName", "Value": {"Ref": group}}], alarm
            assert {"Ref": group} in res[f"{alarm}{k}"]["Properties"]["AlarmDescription"]["Fn::Join"][1]
        assert out[f"AutoScalingGroup{k}"]["Value"] == {"Ref": group}
    # The mapping covers every slot the Slots parameter documents.
    zones = cfn_yaml.load(ROOT / "cloudformation/fleet.yaml")["Mappings"]["SlotZones"]
    assert zones == {str(k): {"Subnet": (k + 1) % 2} for k in range(1, 17)}


def test_role_policy_is_the_documented_policy():
    fleet = cfn_yaml.load(ROOT / "cloudformation/fleet.yaml")
    policies = fleet["Resources"]["InstanceRole"]["Properties"]["Policies"]
    assert len(policies) == 1
    documented = json.loads((ROOT / "docs/iam-policy.json").read_text())
    assert policies[0]["PolicyDocument"] == documented


def test_each_address_is_tagged_with_its_set_and_the_slot_it_is_exported_as():
    # The fleet's group N claims the export AllocationIdN; the proxy orders handoffs by the
    # address's slot tag. Both must name the same address, or "slot 2" would be group 3's.
    addresses = cfn_expand.expand("addresses.yaml")
    for n in range(1, 5):
        assert addresses["Outputs"][f"AllocationId{n}"]["Value"] == {"Fn::GetAtt": [f"Eip{n}", "AllocationId"]}
        tags = {t["Key"]: t["Value"] for t in addresses["Resources"][f"Eip{n}"]["Properties"]["Tags"]}
        assert tags["static-ingress:slot"] == str(n)
        assert tags["static-ingress:address-set"] == {"Ref": "AWS::StackName"}
        assert tags["static-ingress:managed"] == "true"


def _seconds(duration):
    value, unit = re.fullmatch(r"(\d+)(ms|s|m|h)", duration).groups()
    return int(value) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def test_every_group_holds_a_terminating_instance_for_the_whole_drain():
    fleet = cfn_expand.expand("fleet.yaml")
    # The proxy's defaults, as the documented example config has them.
    lifecycle = tomllib.loads((ROOT / "docs/static-ingress.example.toml").read_text())["lifecycle"]
    drain = _seconds(lifecycle["drain_delay"]) + _seconds(lifecycle["grace_period"])
    timeout = fleet["Parameters"]["RetireTimeoutSeconds"]
    # Even at its lowest, the hook outlasts the default drain by the time to see the state and
    # move the address; Auto Scaling takes 30 to 7200 s.
    assert timeout["MinValue"] >= drain + 30
    assert timeout["MinValue"] <= timeout["Default"] <= timeout["MaxValue"] <= 7200
    for n in range(1, 5):
        assert _group(fleet, n)["LifecycleHookSpecificationList"] == [{
            "LifecycleHookName": "static-ingress-drain",
            "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING",
            "DefaultResult": "CONTINUE",
            "HeartbeatTimeout": {"Ref": "RetireTimeoutSeconds"},
        }]


def test_every_group_launches_a_replacement_before_terminating():
    fleet = cfn_expand.expand("fleet.yaml")
    for n in range(1, 5):
        assert _group(fleet, n)["InstanceMaintenancePolicy"] == {
            "MinHealthyPercentage": 100, "MaxHealthyPercentage": 200}


def test_handoffs_at_once_reaches_the_proxy_and_leaves_an_address_announced():
    fleet = cfn_yaml.load(ROOT / "cloudformation/fleet.yaml")
    param = fleet["Parameters"]["HandoffsAtOnce"]
    # Of the default four addresses, at least one stays announced throughout a release.
    assert (param["Type"], param["Default"], param["MinValue"], param["MaxValue"]) == ("Number", 1, 1, 3)
    user_data = fleet["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]
    doc = yaml.safe_load(user_data["Fn::Base64"]["Fn::Sub"])
    [drop_in] = [f for f in doc["write_files"]
                 if f["path"] == "/etc/static-ingress/static-ingress.toml.d/50-launch-template.toml"]
    assert "[eip]\nhandoffs_at_once = ${HandoffsAtOnce}\n" in drop_in["content"]
    # BackendAddress's pattern keeps the quoted TOML string whole (no quote or backslash).
    assert 'address = "${BackendAddress}"\n' in drop_in["content"]
    assert not re.fullmatch(fleet["Parameters"]["BackendAddress"]["AllowedPattern"], 'a"b:1')


def test_the_operator_port_reaches_the_proxy_and_only_the_monitoring_source_reaches_it():
    fleet = cfn_yaml.load(ROOT / "cloudformation/fleet.yaml")
    user_data = fleet["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]
    doc = yaml.safe_load(user_data["Fn::Base64"]["Fn::Sub"])
    [drop_in] = [f for f in doc["write_files"]
                 if f["path"] == "/etc/static-ingress/static-ingress.toml.d/50-launch-template.toml"]
    assert 'operator_listen = ["0.0.0.0:${OperatorPort}"]\n' in drop_in["content"]
    ingress = fleet["Resources"]["MonitoringIngress"]
    assert ingress["Condition"] == "HasMonitoringSource"
    props = ingress["Properties"]
    assert props["FromPort"] == props["ToPort"] == {"Ref": "OperatorPort"}
    # The stack refuses an operator port on the health port, and the page open to Route 53.
    asserts = fleet["Rules"]["OperatorPortApartFromTheHealthPort"]["Assertions"]
    refs = [a["Assert"]["Fn::Not"][0]["Fn::Equals"] for a in asserts]
    assert [{"Ref": "OperatorPort"}, {"Ref": "HealthPort"}] in refs
    assert [{"Ref": "MonitoringSource"}, {"Ref": "HealthCheckerPrefixListId"}] in refs
    addresses = cfn_yaml.load(ROOT / "cloudformation/addresses.yaml")
    health_path = addresses["Parameters"]["HealthPath"]["AllowedPattern"]
    assert re.fullmatch(health_path, "/health") and not re.fullmatch(health_path, "/status")
    pattern = fleet["Parameters"]["MonitoringSource"]["AllowedPattern"]
    for good in ["", "sg-0123abcd", "pl-0123abcd"]:
        assert re.fullmatch(pattern, good), good
    for bad in ["0.0.0.0/0", "10.0.0.0/8", "sg-", "i-0123"]:
        assert not re.fullmatch(pattern, bad), bad


def guard(tmp_path, template_data, name="template.json"):
    """Runs cfn-guard on the template; returns (exit code, rule name -> status)."""
    path = tmp_path / name
    path.write_text(json.dumps(template_data))
    r = subprocess.run(
        [tool("cfn-guard", "STATIC_INGRESS_TOOLS_BIN"), "validate", "--rules", str(RULES),
         "--data", str(path), "--output-format", "json", "--show-summary", "none"],
        capture_output=True, text=True, timeout=120,
    )
    statuses = {}
    for report in _json_documents(r.stdout):
        for rule in report.get("not_compliant", []):
            statuses[rule["Rule"]["name"] if "Rule" in rule else rule.get("name")] = "FAIL"
    return r, statuses


def _json_documents(text):
    decoder = json.JSONDecoder()
    i, out = 0, []
    text = text.strip()
    while i < len(text):
        doc, end = decoder.raw_decode(text, i)
        out.append(doc)
        i = end
        while i < len(text) and text[i].isspace():
            i += 1
    return out


@pytest.mark.parametrize("n", COUNTS)
@pytest.mark.parametrize("template", ["addresses.yaml", "fleet.yaml"])
def test_guard_passes_on_the_template(tmp_path, template, n):
    r, failed = guard(tmp_path, cfn_expand.expand(template, cfn_expand.slots(n)))
    assert r.returncode == 0 and not failed, r.stdout + r.stderr


@pytest.mark.parametrize("template", ["addresses.yaml", "fleet.yaml"])
def test_guard_refuses_the_template_with_its_loops_unexpanded(tmp_path, template):
    # Unexpanded, the per-slot rules would find no resource to check and pass: this one fails.
    r, failed = guard(tmp_path, cfn_yaml.load(ROOT / "cloudformation" / template))
    assert r.returncode != 0 and failed.get("templates_expanded") == "FAIL", r.stdout


# Broken copies: each change breaks one rule, which cfn-guard must then report as failing.
def _lt(t):
    return t["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["MetadataOptions"]


def _ingress(t):
    return t["Resources"]["ProxySecurityGroup"]["Properties"]["SecurityGroupIngress"]


def _group(t, n):
    return t["Resources"][f"ProxyGroup{n}"]["Properties"]


def _eip_tag(t, n):
    return next(tag for tag in _group(t, n)["Tags"] if tag["Key"] == "static-ingress:eip-allocation-id")


def _generation_tag(t, n):
    return next(tag for tag in _group(t, n)["Tags"] if tag["Key"] == "static-ingress:fleet-generation")


def generation_not_propagated(t):
    _generation_tag(t, 2)["PropagateAtLaunch"] = False


def group_without_generation(t):
    _group(t, 3)["Tags"] = [tag for tag in _group(t, 3)["Tags"] if tag["Key"] != "static-ingress:fleet-generation"]


def generation_fixed(t):
    _generation_tag(t, 4)["Value"] = "1"


def _hooks(t, n):
    return _group(t, n)["LifecycleHookSpecificationList"]


def group_without_hook(t):
    del _group(t, 2)["LifecycleHookSpecificationList"]


def hook_on_launch(t):
    _hooks(t, 1)[0]["LifecycleTransition"] = "autoscaling:EC2_INSTANCE_LAUNCHING"


def hook_abandons(t):
    _hooks(t, 3)[0]["DefaultResult"] = "ABANDON"


def hook_fixed_timeout(t):
    _hooks(t, 4)[0]["HeartbeatTimeout"] = 60


def retire_timeout_below_the_drain(t):
    t["Parameters"]["RetireTimeoutSeconds"]["MinValue"] = 60


def group_without_maintenance_policy(t):
    del _group(t, 1)["InstanceMaintenancePolicy"]


def terminate_then_launch(t):
    _group(t, 4)["InstanceMaintenancePolicy"] = {"MinHealthyPercentage": 0, "MaxHealthyPercentage": 100}


def _statements(t):
    return t["Resources"]["InstanceRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]


def _sid(t, sid):
    return next(st for st in _statements(t) if st["Sid"] == sid)


def _create_tags(t):
    return _sid(t, "TagManagedAddressesWithHandoffKeysOnly")


def _autoscaling_writes(t):
    return _sid(t, "RetireAndReportHealthInThisFleetsGroupsOnly")


def create_tags_on_anything(t):
    _create_tags(t)["Resource"] = "*"


def create_tags_on_unmanaged_addresses(t):
    del _create_tags(t)["Condition"]["StringEquals"]


def create_tags_with_any_key(t):
    del _create_tags(t)["Condition"]["ForAllValues:StringEquals"]


def create_tags_may_rewrite_managed(t):
    _create_tags(t)["Condition"]["ForAllValues:StringEquals"]["aws:TagKeys"].append("static-ingress:managed")


def create_tags_without_handoff_to(t):
    _create_tags(t)["Condition"]["ForAllValues:StringEquals"]["aws:TagKeys"] = ["static-ingress:handoff"]


def create_tags_without_null_guard(t):
    del _create_tags(t)["Condition"]["Null"]


def create_tags_in_another_statement(t):
    _statements(t).append({"Effect": "Allow", "Action": ["ec2:DeleteTags", "ec2:CreateTags"], "Resource": "*"})


def _extra_policy(t, statement):
    t["Resources"]["ExtraPolicy"] = {
        "Type": "AWS::IAM::Policy",
        "Properties": {"PolicyName": "extra", "Roles": [{"Ref": "InstanceRole"}],
                       "PolicyDocument": {"Version": "2012-10-17", "Statement": [statement]}},
    }


def create_tags_in_an_extra_policy(t):
    _extra_policy(t, {"Effect": "Allow", "Action": "ec2:CreateTags", "Resource": "*"})


def set_instance_health_in_an_extra_policy(t):
    _extra_policy(t, {"Effect": "Allow", "Action": "autoscaling:SetInstanceHealth", "Resource": "*"})


def autoscaling_writes_on_anything(t):
    st = _autoscaling_writes(t)
    st["Resource"] = "*"
    del st["Condition"]


def autoscaling_writes_in_a_fixed_fleet(t):
    _autoscaling_writes(t)["Condition"]["StringEquals"]["autoscaling:ResourceTag/static-ingress:fleet"] = "static-fleet-1"


def set_instance_health_beside_describe(t):
    _sid(t, "ReadAutoScalingGroups")["Action"] = ["autoscaling:DescribeAutoScalingGroups", "autoscaling:SetInstanceHealth"]


def _group_tags(t):
    return _sid(t, "MarkUnhealthyReportsOnThisFleetsGroupsOnly")


def group_tags_with_any_key(t):
    del _group_tags(t)["Condition"]["ForAllValues:StringEquals"]


def group_tags_may_rewrite_fleet(t):
    _group_tags(t)["Condition"]["ForAllValues:StringEquals"]["aws:TagKeys"].append("static-ingress:fleet")


def group_tags_without_null_guard(t):
    del _group_tags(t)["Condition"]["Null"]


def group_tags_in_any_group(t):
    del _group_tags(t)["Condition"]["StringEquals"]


def role_without_fleet_tag(t):
    del t["Resources"]["InstanceRole"]["Properties"]["Tags"]


def group_fleet_tag_fixed(t):
    next(tag for tag in _group(t, 3)["Tags"] if tag["Key"] == "static-ingress:fleet")["Value"] = "static-fleet"


def imds_optional(t):
    _lt(t)["HttpTokens"] = "optional"


def imds_tags_off(t):
    _lt(t)["InstanceMetadataTags"] = "disabled"


def no_metadata_options(t):
    del t["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["MetadataOptions"]


def hop_limit_2(t):
    _lt(t)["HttpPutResponseHopLimit"] = 2


def health_port_open_to_world(t):
    rule = _ingress(t)[1]
    del rule["SourcePrefixListId"]
    rule["CidrIp"] = "0.0.0.0/0"


def health_port_from_a_cidr(t):
    rule = _ingress(t)[1]
    del rule["SourcePrefixListId"]
    rule["CidrIp"] = "10.0.0.0/8"


def health_port_from_the_monitoring_source(t):
    _ingress(t)[1]["SourcePrefixListId"] = {"Ref": "MonitoringSource"}


def operator_port_from_a_cidr(t):
    rule = t["Resources"]["MonitoringIngress"]["Properties"]
    del rule["SourcePrefixListId"], rule["SourceSecurityGroupId"]
    rule["CidrIp"] = "10.0.0.0/8"


def operator_port_from_nowhere_named(t):
    rule = t["Resources"]["MonitoringIngress"]["Properties"]
    del rule["SourcePrefixListId"], rule["SourceSecurityGroupId"]


def portless_rule_from_a_cidr(t):
    _ingress(t).append({"IpProtocol": "-1", "CidrIp": "10.0.0.0/8"})


def range_from_443_from_a_group(t):
    _ingress(t).append({"IpProtocol": "tcp", "FromPort": 443, "ToPort": 9001, "SourceSecurityGroupId": "sg-0123abcd"})


def health_port_from_a_group(t):
    rule = _ingress(t)[1]
    rule["SourceSecurityGroupId"] = "sg-0123abcd"


def health_port_range_up_to_the_operator_port(t):
    _ingress(t)[1]["ToPort"] = {"Ref": "OperatorPort"}


def operator_port_from_the_health_checkers(t):
    rule = t["Resources"]["MonitoringIngress"]["Properties"]
    del rule["SourceSecurityGroupId"]
    rule["SourcePrefixListId"] = {"Ref": "HealthCheckerPrefixListId"}


def extra_ingress_resource_open_to_world(t):
    t["Resources"]["OpenHealth"] = {
        "Type": "AWS::EC2::SecurityGroupIngress",
        "Properties": {"GroupId": {"Ref": "ProxySecurityGroup"}, "IpProtocol": "tcp",
                       "FromPort": 9001, "ToPort": 9001, "CidrIp": "0.0.0.0/0"},
    }


def group_of_two(t):
    _group(t, 3)["MaxSize"] = "2"


def group_of_none(t):
    _group(t, 1)["MinSize"] = "0"


def two_groups_one_address(t):
    _eip_tag(t, 2)["Value"] = copy.deepcopy(_eip_tag(t, 1)["Value"])


def tag_not_propagated(t):
    _eip_tag(t, 4)["PropagateAtLaunch"] = False


def group_without_address(t):
    _group(t, 2)["Tags"] = [tag for tag in _group(t, 2)["Tags"]
                            if tag["Key"] != "static-ingress:eip-allocation-id"]


def group_without_tags(t):
    del _group(t, 3)["Tags"]


def import_from_a_fixed_stack(t):
    _eip_tag(t, 2)["Value"]["Fn::ImportValue"]["Fn::Sub"][1]["Addresses"] = "static-addresses"


def fleet_without_groups(t):
    for name in [k for k in t["Resources"] if k.startswith("ProxyGroup")]:
        del t["Resources"][name]


def addresses_without_eips(t):
    for name in [k for k in t["Resources"] if k.startswith("Eip")]:
        del t["Resources"][name]


def fifth_group(t):
    t["Resources"]["ProxyGroup5"] = copy.deepcopy(t["Resources"]["ProxyGroup4"])


def wildcard_service_action(t):
    _statements(t)[0]["Action"] = ["ec2:Describe*"]


def wildcard_action(t):
    _statements(t)[1]["Action"] = "*"


def not_action(t):
    st = _statements(t)[2]
    st["NotAction"] = st.pop("Action")


def managed_policy(t):
    t["Resources"]["InstanceRole"]["Properties"]["ManagedPolicyArns"] = [
        "arn:aws:iam::aws:policy/AmazonEC2FullAccess"]


def untagged_eip(t):
    t["Resources"]["Eip3"]["Properties"]["Tags"] = [{"Key": "Name", "Value": "x"}]


def eip_tagged_false(t):
    t["Resources"]["Eip2"]["Properties"]["Tags"][0]["Value"] = "false"


def _eip_tags(t, n):
    return t["Resources"][f"Eip{n}"]["Properties"]["Tags"]


def _eip_tag_named(t, n, key):
    return next(tag for tag in _eip_tags(t, n) if tag["Key"] == key)


def eip_without_slot(t):
    t["Resources"]["Eip4"]["Properties"]["Tags"] = [
        tag for tag in _eip_tags(t, 4) if tag["Key"] != "static-ingress:slot"]


def two_eips_one_slot(t):
    _eip_tag_named(t, 3, "static-ingress:slot")["Value"] = "2"


def eip_slot_not_a_number(t):
    _eip_tag_named(t, 1, "static-ingress:slot")["Value"] = "first"


def eip_without_address_set(t):
    t["Resources"]["Eip2"]["Properties"]["Tags"] = [
        tag for tag in _eip_tags(t, 2) if tag["Key"] != "static-ingress:address-set"]


def address_set_fixed(t):
    # A fixed name would join the addresses of two stacks (e.g. staging and production) into one set.
    _eip_tag_named(t, 1, "static-ingress:address-set")["Value"] = "static-addresses"


def fifth_eip(t):
    t["Resources"]["Eip5"] = copy.deepcopy(t["Resources"]["Eip4"])


BROKEN = [
    ("fleet.yaml", imds_optional, "imdsv2_required"),
    ("fleet.yaml", imds_tags_off, "imdsv2_required"),
    ("fleet.yaml", no_metadata_options, "imdsv2_required"),
    ("fleet.yaml", hop_limit_2, "imds_hop_limit_one"),
    ("fleet.yaml", health_port_open_to_world, "only_443_open_to_world"),
    ("fleet.yaml", extra_ingress_resource_open_to_world, "only_443_open_to_world"),
    ("fleet.yaml", health_port_from_a_cidr, "health_port_from_prefix_list_only"),
    ("fleet.yaml", health_port_from_the_monitoring_source, "health_port_from_prefix_list_only"),
    ("fleet.yaml", operator_port_from_a_cidr, "health_port_from_prefix_list_only"),
    ("fleet.yaml", operator_port_from_nowhere_named, "health_port_from_prefix_list_only"),
    ("fleet.yaml", portless_rule_from_a_cidr, "health_port_from_prefix_list_only"),
    ("fleet.yaml", range_from_443_from_a_group, "health_port_from_prefix_list_only"),
    ("fleet.yaml", health_port_from_a_group, "health_port_from_prefix_list_only"),
    ("fleet.yaml", health_port_range_up_to_the_operator_port, "health_port_from_prefix_list_only"),
    ("fleet.yaml", operator_port_from_the_health_checkers, "health_port_from_prefix_list_only"),
    ("fleet.yaml", group_of_two, "groups_hold_one_instance"),
    ("fleet.yaml", group_of_none, "groups_hold_one_instance"),
    ("fleet.yaml", two_groups_one_address, "groups_tag_distinct_eips"),
    ("fleet.yaml", tag_not_propagated, "groups_tag_distinct_eips"),
    ("fleet.yaml", group_without_address, "groups_tag_distinct_eips"),
    ("fleet.yaml", group_without_tags, "groups_tag_distinct_eips"),
    ("fleet.yaml", fifth_group, "groups_tag_distinct_eips"),
    ("fleet.yaml", import_from_a_fixed_stack, "groups_tag_distinct_eips"),
    ("fleet.yaml", fleet_without_groups, "loops_made_their_resources"),
    ("addresses.yaml", addresses_without_eips, "loops_made_their_resources"),
    ("fleet.yaml", generation_not_propagated, "groups_tag_fleet_generation"),
    ("fleet.yaml", group_without_generation, "groups_tag_fleet_generation"),
    ("fleet.yaml", generation_fixed, "groups_tag_fleet_generation"),
    ("fleet.yaml", group_without_hook, "groups_drain_before_termination"),
    ("fleet.yaml", hook_on_launch, "groups_drain_before_termination"),
    ("fleet.yaml", hook_abandons, "groups_drain_before_termination"),
    ("fleet.yaml", hook_fixed_timeout, "groups_drain_before_termination"),
    ("fleet.yaml", retire_timeout_below_the_drain, "groups_drain_before_termination"),
    ("fleet.yaml", group_without_maintenance_policy, "groups_launch_before_terminating"),
    ("fleet.yaml", terminate_then_launch, "groups_launch_before_terminating"),
    ("fleet.yaml", create_tags_on_anything, "create_tags_only_handoff_keys_on_managed_addresses"),
    ("fleet.yaml", create_tags_on_unmanaged_addresses, "create_tags_only_handoff_keys_on_managed_addresses"),
    ("fleet.yaml", create_tags_with_any_key, "create_tags_only_handoff_keys_on_managed_addresses"),
    ("fleet.yaml", create_tags_may_rewrite_managed, "create_tags_only_handoff_keys_on_managed_addresses"),
    ("fleet.yaml", create_tags_without_handoff_to, "create_tags_only_handoff_keys_on_managed_addresses"),
    ("fleet.yaml", create_tags_without_null_guard, "create_tags_only_handoff_keys_on_managed_addresses"),
    ("fleet.yaml", create_tags_in_another_statement, "create_tags_only_handoff_keys_on_managed_addresses"),
    ("fleet.yaml", create_tags_in_an_extra_policy, "create_tags_only_handoff_keys_on_managed_addresses"),
    ("fleet.yaml", autoscaling_writes_on_anything, "autoscaling_writes_only_in_this_fleet"),
    ("fleet.yaml", set_instance_health_in_an_extra_policy, "autoscaling_writes_only_in_this_fleet"),
    ("fleet.yaml", autoscaling_writes_in_a_fixed_fleet, "autoscaling_writes_only_in_this_fleet"),
    ("fleet.yaml", set_instance_health_beside_describe, "autoscaling_writes_only_in_this_fleet"),
    ("fleet.yaml", group_tags_with_any_key, "group_tags_only_the_report_mark"),
    ("fleet.yaml", group_tags_may_rewrite_fleet, "group_tags_only_the_report_mark"),
    ("fleet.yaml", group_tags_without_null_guard, "group_tags_only_the_report_mark"),
    ("fleet.yaml", group_tags_in_any_group, "autoscaling_writes_only_in_this_fleet"),
    ("fleet.yaml", role_without_fleet_tag, "groups_and_role_tagged_with_fleet"),
    ("fleet.yaml", group_fleet_tag_fixed, "groups_and_role_tagged_with_fleet"),
    ("fleet.yaml", wildcard_service_action, "no_wildcard_actions_in_roles"),
    ("fleet.yaml", wildcard_action, "no_wildcard_actions_in_roles"),
    ("fleet.yaml", not_action, "no_wildcard_actions_in_roles"),
    ("fleet.yaml", managed_policy, "no_wildcard_actions_in_roles"),
    ("addresses.yaml", untagged_eip, "eips_tagged_managed"),
    ("addresses.yaml", eip_tagged_false, "eips_tagged_managed"),
    ("addresses.yaml", eip_without_slot, "eips_tagged_for_handoff"),
    ("addresses.yaml", two_eips_one_slot, "eips_tagged_for_handoff"),
    ("addresses.yaml", eip_slot_not_a_number, "eips_tagged_for_handoff"),
    ("addresses.yaml", eip_without_address_set, "eips_tagged_for_handoff"),
    ("addresses.yaml", address_set_fixed, "eips_tagged_for_handoff"),
    ("addresses.yaml", fifth_eip, "eips_tagged_for_handoff"),
]


@pytest.mark.parametrize("template,breakage,rule", BROKEN, ids=[b[1].__name__ for b in BROKEN])
def test_guard_fails_on_a_broken_copy(tmp_path, template, breakage, rule):
    data = cfn_expand.expand(template)
    breakage(data)
    r, failed = guard(tmp_path, data)
    assert r.returncode != 0, f"cfn-guard passed a copy broken by {breakage.__name__}"
    assert failed.get(rule) == "FAIL", f"{rule} not reported as failing: {sorted(failed)}\n{r.stdout}"
