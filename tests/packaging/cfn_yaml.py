"""Reads CloudFormation YAML (with its short-form tags such as !Ref and !Sub) into plain data,
the long form JSON would have: `!Ref X` becomes {"Ref": "X"}, `!GetAtt A.B` becomes
{"Fn::GetAtt": ["A", "B"]}, any other `!Fn x` becomes {"Fn::Fn": x}."""

import pathlib

import yaml


class _Loader(yaml.SafeLoader):
    pass


def _construct(loader, tag_suffix, node):
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if tag_suffix == "Ref":
        return {"Ref": value}
    if tag_suffix == "GetAtt" and isinstance(value, str):
        return {"Fn::GetAtt": value.split(".", 1)}
    return {f"Fn::{tag_suffix}": value}


_Loader.add_multi_constructor("!", _construct)


def load(path):
    """The template at `path` as plain dicts and lists."""
    return yaml.load(pathlib.Path(path).read_text(), Loader=_Loader)
