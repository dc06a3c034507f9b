"""Every command in the READMEs and workflow pages parses with the real `megastack` parser, names a real
make target or script, and every file path it mentions that ships with the repo exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from shared.paths import REPO_ROOT

PAGES = sorted(
    [
        REPO_ROOT / "README.md",
        *REPO_ROOT.glob("docs/**/*.md"),
        *REPO_ROOT.glob("services/*/README.md"),
        REPO_ROOT / "deploy" / "README.md",
    ]
)


def commands(page: Path) -> list[str]:
    out = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                out += [c.strip() for c in re.split(r"\s(?:;|&&)\s", line) if c.strip()]
    return out


def _makefile_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z-]*):", (REPO_ROOT / "Makefile").read_text(), re.M))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_commands_on_the_page_are_real(page, monkeypatch):
    from tools.cli.main import build_parser

    parser = build_parser()
    targets = _makefile_targets()
    for cmd in commands(page):
        argv = shlex.split(cmd.replace("<", "'<").replace(">", ">'"))
        if argv[0] == "megastack":
            try:
                parser.parse_args(argv[1:])
            except SystemExit:
                pytest.fail(f"{page.relative_to(REPO_ROOT)}: `{cmd}` does not parse")
        elif argv[0] == "make":
            assert all(a in targets or "=" in a for a in argv[1:] if not a.startswith("-")), (
                f"{page.name}: {cmd}"
            )
        elif argv[0] in ("python", "python3"):
            assert argv[1] == "-m" or (REPO_ROOT / argv[1]).is_file(), f"{page.name}: {cmd}"
        for word in argv:
            if re.match(
                r"^(deploy|tools|services|shared|protos|tests|docs)/[\w./-]+\.(ya?ml|py|json|md)$", word
            ):
                assert (REPO_ROOT / word).is_file(), f"{page.name}: {word} does not exist"
