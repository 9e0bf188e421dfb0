"""The report of ``make mutate``: per-module scores and every surviving mutant's diff.

Run from the repository root after ``mutmut run`` (it reads ``mutants/``):

    python -m tests.mutation_report            # scores, then the survivors' diffs
    python -m tests.mutation_report --brief    # scores and survivor names only
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict

from mutmut.__main__ import (  # type: ignore[import-untyped]
    SourceFileMutationData,
    status_by_exit_code,
    walk_mutatable_files,
)
from mutmut.mutation.diff_apply import get_diff_for_mutant  # type: ignore[import-untyped]


def main(argv: list[str]) -> int:
    brief = "--brief" in argv
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    survivors: list[tuple[str, str]] = []
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        for name, code in data.exit_code_by_key.items():
            status = status_by_exit_code[code]
            counts[str(path)][status] += 1
            if status in ("survived", "no tests"):
                survivors.append((name, str(path)))
    total: Counter[str] = Counter()
    print(
        f"{'module':40} {'mutants':>8} {'killed':>8} {'survived':>9} {'no tests':>9} {'score':>7}"
    )
    for path in sorted(counts):
        c = counts[path]
        total.update(c)
        print(_line(path, c))
    print(_line("TOTAL", total))
    for name, path in survivors:
        if brief:
            print(name)
        else:
            print(f"\n# {name}")
            print(get_diff_for_mutant(name, path=path))
    return 0


def _line(label: str, c: Counter[str]) -> str:
    n = sum(c.values())
    killed = c["killed"] + c["timeout"] + c["caught by type check"]
    score = killed / n if n else 1.0
    return f"{label:40} {n:8} {killed:8} {c['survived']:9} {c['no tests']:9} {score:7.1%}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
