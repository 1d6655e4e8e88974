"""One key-mapping mechanism for every foreign checkpoint format (transformers CLIP, SigLIP, ...).

A format's weights are described by one table of rules ``(source keys, target keys[, op[, parts]])``:

* ``{}`` in a key stands for a block index (``text_model.encoder.layers.{}.mlp.fc1.weight``); the
  source and target templates of a rule carry the same number of ``{}``.
* several source keys are concatenated along dim 0 into one target (q/k/v projections into a fused
  ``in_proj_weight``); one source key is split along dim 0 into several targets (a fused ``[q; k; v]``
  into timm's ``q`` and ``kv``), in the proportions ``parts`` (equal when omitted).
* ``op`` changes one tensor: ``"T"`` transposes ([out, in] vs [in, out]); ``"unsqueeze0"`` /
  ``"squeeze0"`` add / drop a leading axis of size 1 ([N, D] vs [1, N, D], or [] vs [1]).
* a target of ``None`` drops the source key deliberately (buffers a format persists but we rebuild).

``KeyMap.inverse()`` generates the reverse table (swapped keys, inverted ops, drops removed), so a
reader and a writer can never disagree. ``KeyMap.apply`` consumes every source key or fails naming
the ones nothing maps, and, given the target's expected keys, fails naming every unfilled target
together with the source keys it needs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .io import CheckpointError

# op -> (function, inverse op)
OPS = {
    "copy": (lambda t: t, "copy"),
    "T": (lambda t: t.t(), "T"),  # [out, in] <-> [in, out]
    "unsqueeze0": (lambda t: t.unsqueeze(0), "squeeze0"),  # [N, D] -> [1, N, D]; [] -> [1]
    "squeeze0": (lambda t: t.squeeze(0), "unsqueeze0"),  # [1, N, D] -> [N, D]; [1] -> []
}
_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")  # a block index: a dot-delimited run of digits
_LIMIT = 8  # keys named per problem in an error message

Keys = Union[str, Sequence[str]]
RuleSpec = Union[Tuple[Keys, Optional[Keys]], Tuple[Keys, Optional[Keys], str],
                 Tuple[Keys, Optional[Keys], str, Sequence[int]]]


def split_indices(key: str) -> Tuple[str, Tuple[int, ...]]:
    """``"a.3.b.0.c"`` -> ``("a.{}.b.{}.c", (3, 0))``; keys without block indices come back unchanged."""
    return _INDEX.sub("{}", key), tuple(int(m) for m in _INDEX.findall(key))


@dataclass(frozen=True)
class Rule:
    """Source keys (concatenated along dim 0) -> ``op`` -> target keys (split along dim 0 by ``parts``)."""

    src: Tuple[str, ...]
    dst: Optional[Tuple[str, ...]]  # None: a deliberate drop
    op: str = "copy"
    parts: Optional[Tuple[int, ...]] = None  # relative dim-0 sizes of the keys on the side with several

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"rule {self.src}: unknown op {self.op!r} (known: {sorted(OPS)})")
        keys = self.src + (self.dst or ())
        if any(_INDEX.search(k) for k in keys):
            raise ValueError(f"rule {self.src} -> {self.dst}: write block indices as '{{}}', not digits")
        if self.dst is None:
            return
        if len({k.count("{}") for k in keys}) != 1:
            raise ValueError(f"rule {self.src} -> {self.dst}: templates differ in their number of '{{}}'")
        if len(self.src) > 1 and len(self.dst) > 1:
            raise ValueError(f"rule {self.src} -> {self.dst}: only one side may hold several keys")
        if self.op != "copy" and len(keys) != 2:
            raise ValueError(f"rule {self.src} -> {self.dst}: op {self.op!r} needs one key on each side")
        many = max(len(self.src), len(self.dst))
        if self.parts is not None and len(self.parts) != many:
            raise ValueError(f"rule {self.src} -> {self.dst}: parts {self.parts} for {many} keys")

    def inverse(self) -> "Rule":
        assert self.dst is not None, "drops have no inverse"
        return Rule(self.dst, self.src, OPS[self.op][1], self.parts)

    def apply(self, tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """The target tensors for one instance of the rule (``tensors`` in ``src`` order)."""
        x = tensors[0] if len(tensors) == 1 else torch.cat(list(tensors), dim=0)  # n x [d_i, ...] -> [sum d_i, ...]
        x = OPS[self.op][0](x)
        if len(self.dst) == 1:
            return [x.contiguous() if self.op == "T" else x]
        parts = self.parts or (1,) * len(self.dst)
        unit, rest = divmod(x.shape[0], sum(parts))
        if rest:
            raise CheckpointError(f"{self.src[0]}: dim 0 of size {x.shape[0]} does not split as {parts}")
        return [p.clone() for p in x.split([unit * p for p in parts], dim=0)]  # [sum, ...] -> n x [d_i, ...]


class KeyMap:
    """A table of rules from one format's keys (``src_name``) to another's (``dst_name``)."""

    def __init__(self, name: str, rules: Iterable[Union[Rule, RuleSpec]], src_name: str = "source",
                 dst_name: str = "target"):
        self.name, self.src_name, self.dst_name = name, src_name, dst_name
        self.rules: List[Rule] = [r if isinstance(r, Rule) else _rule(*r) for r in rules]
        self._by_src: Dict[str, Tuple[Rule, int]] = {}
        self._by_dst: Dict[str, Rule] = {}
        for rule in self.rules:
            for slot, key in enumerate(rule.src):
                if key in self._by_src:
                    raise ValueError(f"{name}: source key {key!r} appears in two rules")
                self._by_src[key] = (rule, slot)
            for key in rule.dst or ():
                if key in self._by_dst:
                    raise ValueError(f"{name}: target key {key!r} is filled by two rules")
                self._by_dst[key] = rule

    def inverse(self) -> "KeyMap":
        """The reverse table: every rule but the drops, with keys swapped and ops inverted."""
        return KeyMap(self.name, [r.inverse() for r in self.rules if r.dst is not None],
                      src_name=self.dst_name, dst_name=self.src_name)

    def __len__(self) -> int:
        return len(self.rules)

    def apply(self, state_dict: Mapping[str, torch.Tensor], expected: Optional[Mapping[str, object]] = None,
              source: str = "state dict") -> Dict[str, torch.Tensor]:
        """``state_dict`` mapped through the table; raises ``CheckpointError`` naming what does not fit.

        Every source key must be consumed by a rule. With ``expected`` (the target's keys, e.g. a
        model's ``state_dict()``, values with ``.shape``) every expected key must be filled, with that
        shape, and nothing else may be produced.
        """
        instances: Dict[Tuple[Rule, Tuple[int, ...]], Dict[int, torch.Tensor]] = {}
        unused = []
        for key, tensor in state_dict.items():
            template, index = split_indices(key)
            hit = self._by_src.get(template)
            if hit is None:
                unused.append(key)
            elif hit[0].dst is not None:
                instances.setdefault((hit[0], index), {})[hit[1]] = tensor
        if unused:
            raise CheckpointError(f"{source}: {len(unused)} unexpected {self.src_name} key(s) "
                                  f"(no {self.name} mapping): {_names(unused)}")
        out: Dict[str, torch.Tensor] = {}
        unfilled: List[str] = []
        for (rule, index), found in instances.items():
            if len(found) < len(rule.src):
                unfilled += [_needs(rule, index, state_dict, rule.dst[0].format(*index))]
                continue
            for template, tensor in zip(rule.dst, rule.apply([found[i] for i in range(len(rule.src))])):
                out[template.format(*index)] = tensor
        if expected is not None:
            unfilled += [self._needs(key, state_dict) for key in expected if key not in out]
            extra = [k for k in out if k not in expected]
            if extra:
                raise CheckpointError(f"{source}: {len(extra)} {self.dst_name} key(s) the target does not "
                                      f"have: {_names(extra)}")
        if unfilled:
            raise CheckpointError(f"{source}: {len(unfilled)} {self.dst_name} key(s) unfilled: {_names(unfilled)}")
        if expected is not None:
            misshaped = [f"{k} {tuple(v.shape)} vs expected {tuple(expected[k].shape)}"
                         for k, v in out.items() if tuple(v.shape) != tuple(expected[k].shape)]
            if misshaped:
                raise CheckpointError(f"{source}: {len(misshaped)} mis-shaped {self.dst_name} key(s): "
                                      f"{_names(misshaped)}")
        return out

    def _needs(self, target_key: str, state_dict: Mapping[str, torch.Tensor]) -> str:
        template, index = split_indices(target_key)
        rule = self._by_dst.get(template)
        if rule is None:
            return f"{target_key} (no {self.name} rule fills it)"
        return _needs(rule, index, state_dict, target_key)


def _needs(rule: Rule, index: Tuple[int, ...], state_dict: Mapping[str, torch.Tensor], target_key: str) -> str:
    missing = [k.format(*index) for k in rule.src if k.format(*index) not in state_dict]
    return f"missing {', '.join(missing)} (needed for {target_key})"


def _rule(src: Keys, dst: Optional[Keys], op: str = "copy", parts: Optional[Sequence[int]] = None) -> Rule:
    as_tuple = (lambda k: (k,) if isinstance(k, str) else tuple(k))
    return Rule(as_tuple(src), None if dst is None else as_tuple(dst), op, None if parts is None else tuple(parts))


def prefixed(src_prefix: str, dst_prefix: str, rules: Iterable[RuleSpec]) -> List[Rule]:
    """``rules`` (e.g. one transformer block's) with every source / target key under the given prefixes."""
    out = []
    for spec in rules:
        rule = _rule(*spec)
        out.append(Rule(tuple(src_prefix + k for k in rule.src),
                        None if rule.dst is None else tuple(dst_prefix + k for k in rule.dst), rule.op, rule.parts))
    return out


def _names(items: List[str]) -> str:
    more = f" (+{len(items) - _LIMIT} more)" if len(items) > _LIMIT else ""
    return ", ".join(items[:_LIMIT]) + more
