"""The settings table of docs/configuration.md, from the one place settings are declared
(`jaxgen.config_sources.SETTINGS`): every flag, its aliases, preset key, environment variable,
commands and default. `python tools/gen_config_docs.py --write` updates the docs page between
its markers; tests/test_config.py fails when the page is stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxgen.config_sources import SETTINGS, _default_text  # noqa: E402

DOC = ROOT / "docs" / "configuration.md"
BEGIN, END = "<!-- settings table: tools/gen_config_docs.py -->", "<!-- end of settings table -->"


def table() -> str:
    rows = ["| flag (preset key) | aliases | env | commands | default | what |",
            "|---|---|---|---|---|---|"]
    for s in SETTINGS:
        flag = s.flags[0] + (" / --no-" + s.name if s.type is bool else "")
        rows.append("| `{}` (`{}`) | {} | {} | {} | {} | {} |".format(
            flag, s.name, ", ".join(f"`{a}`" for a in s.flags[1:]) or "",
            f"`{s.env}`" if s.env else "", ", ".join(sorted(s.commands)),
            _default_text(s).replace("|", "\\|"), s.help.replace("|", "\\|")))
    return "\n".join(rows)


def rendered(page: str) -> str:
    head, _, rest = page.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="update docs/configuration.md in place")
    args = p.parse_args()
    if args.write:
        DOC.write_text(rendered(DOC.read_text()))
    else:
        print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
