"""`python -m launcher.tasks [TASK ...]`: each built-in task's options (`task.options`) as Markdown tables.

The tables come from the tasks' option classes (field docstrings, defaults, bounds); docs/cli.md
holds this output, and tests/test_task_options.py checks that it is up to date.
"""

from __future__ import annotations

import sys

from launcher.errors import fail
from launcher.tasks import BUILTIN_OPTIONS, builtin_options, options_table


def main(argv: list[str] | None = None) -> None:
    names = sys.argv[1:] if argv is None else argv
    if any(n in ("-h", "--help") for n in names):
        print(__doc__.strip())
        return
    unknown = [n for n in names if n not in BUILTIN_OPTIONS]
    if unknown:
        fail(f"unknown task {unknown[0]!r}; use one of {', '.join(BUILTIN_OPTIONS)}")
    models = builtin_options()
    print("\n\n".join(f"### `{name}`\n\n{options_table(models[name])}" for name in names or BUILTIN_OPTIONS))


if __name__ == "__main__":
    main()
