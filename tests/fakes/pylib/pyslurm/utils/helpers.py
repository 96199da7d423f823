"""Fake pyslurm.utils.helpers: host list expansion (plain names and one bracketed range)."""

from __future__ import annotations

import re


def nodelist_from_range_str(nodelist: str) -> list[str]:
    names = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", nodelist):
        m = re.fullmatch(r"(.*)\[(\d+)-(\d+)\]", part)
        if m:
            prefix, first, last = m.groups()
            names += [f"{prefix}{i:0{len(first)}d}" for i in range(int(first), int(last) + 1)]
        else:
            names.append(part)
    return names
