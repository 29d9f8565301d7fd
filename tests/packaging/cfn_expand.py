"""The templates as CloudFormation runs them: their `Fn::ForEach` loops expanded by the
AWS::LanguageExtensions transform for a given list of slots, so that cfn-guard and moto (which
know no transforms) see one resource per slot. The expansion is cfn-lint's (pinned in
scripts/requirements.txt), the implementation cfn-lint itself lints with."""

import json
import pathlib

from cfnlint.decode import decode_str
from cfnlint.template import Template
from cfnlint.template.transforms._language_extensions import language_extension

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_SLOTS = ["1", "2", "3", "4"]


def expand(template, slots=DEFAULT_SLOTS):
    """`cloudformation/<template>` expanded for `slots` (the Slots parameter), as plain data,
    with Slots defaulting to them and no Transform left."""
    path = ROOT / "cloudformation" / template
    data, matches = decode_str(pathlib.Path(path).read_text())
    assert not matches, matches
    data["Parameters"]["Slots"]["Default"] = ",".join(slots)
    matches, expanded = language_extension(Template(str(path), data, ["us-east-1"]))
    assert not matches, [str(m) for m in matches]
    plain = json.loads(json.dumps(expanded))
    del plain["Transform"]
    return plain


def slots(n):
    """The slot list of n addresses: "1" to "n"."""
    return [str(i) for i in range(1, n + 1)]
