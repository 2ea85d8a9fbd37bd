"""The one strict YAML reader for both config files: size-capped, no duplicate or non-scalar keys, no aliases."""

from __future__ import annotations

from typing import Any

import yaml

from .limits import TooLarge, read_capped


class YAMLFileError(ValueError):
    """The file cannot be read or is not valid YAML; ``str()`` is one line, ``where: problem``, never a value."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses what PyYAML lets through silently: a duplicate key keeps only the last value,
    and aliases open the door to billion-laughs expansion and self-referencing structures (a config shares
    values through ``defaults:``, not ``&anchors``)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not supported",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a plain value, not a list or mapping", key_node.start_mark)
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load(path: str, limit: int) -> Any:
    """The document in the file at ``path`` (None when empty); ``YAMLFileError`` for anything unreadable."""
    try:
        text = read_capped(path, limit).decode("utf-8")
    except TooLarge as e:
        raise YAMLFileError(f"{path}: cannot read config file: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise YAMLFileError(f"{path}: cannot read config file: {reason}") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        # Never str(e): PyYAML quotes the offending line, which may hold a password; the problem itself
        # may quote a key, so callers scrub it too.
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        problem = getattr(e, "problem", None) or "not valid YAML"
        if "tag" in problem:
            problem = "unknown or unsupported tag (!...)"
        raise YAMLFileError(f"{where}: invalid YAML: {problem}") from None
    except RecursionError:
        raise YAMLFileError(f"{path}: nested too deeply to be a config file") from None
