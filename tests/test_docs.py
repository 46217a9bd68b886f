"""The docs stay true: README size, every shell command in a fenced block, every relative link.

Fast (no Ray, no model): the `rime` parser is built from ``orchestrator.cli.build_parser`` and walked
(subcommands through argparse's ``_subparsers`` / ``choices``, options through each subparser's
``_option_string_actions``); bench scripts' options are read from their ``add_argument`` calls with
``ast``, without importing them. Failures name ``file:line`` and the command, so a writer can fix them.

Checked files: README.md, docs/*.md, docs/results/*.md, bench/README.md. Checked blocks: fenced blocks
whose info string is empty, bash, sh, shell, console or zsh. Checked commands: ``rime ...``,
``.venv/bin/rime ...``, ``python -m orchestrator.cli ...`` (any python), ``bash scripts/X.sh`` and
``python bench/X.py`` (any python); anything else (ray, kubectl, curl, mlflow, ...) is left alone.
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_LIMIT = 12 * 1024
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "zsh"}
SEPARATORS = {"|", "||", "&&", ";", "&"}
PREFIX_WORDS = {"time", "env", "nohup", "exec", "sudo", "command"}


def doc_files(root: Path = ROOT) -> list[Path]:
    files = [root / "README.md", root / "bench" / "README.md"]
    files += sorted((root / "docs").glob("*.md")) + sorted((root / "docs" / "results").glob("*.md"))
    return [f for f in files if f.is_file()]


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------- fenced blocks -> commands


@dataclass
class Command:
    where: str  # file:line of the command's first line
    text: str  # the command as written (continuations joined)


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(info string, 1-based line of the block's first content line, lines) of every fenced block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^(\s*)(`{3,}|~{3,})\s*([^`\s]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start, body = m.group(2), m.group(3).lower(), i + 2, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        blocks.append((lang, start, body))
        i += 1
    return blocks


def block_commands(lines: list[str], first_line: int, where: str) -> list[Command]:
    """Logical shell lines of a block: `\\` continuations joined, console prompts stripped, comments kept
    for shlex to drop."""
    out, buf, start = [], "", None
    for n, line in enumerate(lines, first_line):
        s = line.rstrip()
        if start is None:
            if not s.strip() or s.lstrip().startswith("#"):
                continue
            start = n
            s = re.sub(r"^\s*\$\s+", "", s)  # `$ rime ...` in console blocks
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        out.append(Command(f"{where}:{start}", buf.strip()))
        buf, start = "", None
    if buf.strip():
        out.append(Command(f"{where}:{start}", buf.strip()))
    return out


def commands_in(path: Path, root: Path = ROOT) -> list[Command]:
    where = _rel(path, root)
    cmds = []
    for lang, start, body in fenced_blocks(path.read_text(encoding="utf-8")):
        if lang in SHELL_LANGS:
            cmds += block_commands(body, start, where)
    return cmds


def _split_words(text: str) -> list[str]:
    """Shell words; ; & | runs are words of their own unless quoted; # starts a comment."""
    lex = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lex.whitespace_split, lex.commenters = True, "#"
    try:
        return list(lex)
    except ValueError:  # unbalanced quote (a diagram, prose in a plain block): fall back to whitespace
        return text.split("#", 1)[0].split()


def simple_commands(text: str) -> list[list[str]]:
    """Word lists of the simple commands in one shell line: `$(...)` substitutions are taken out and
    checked as commands of their own, the rest is split on | || && ; &."""
    subs = []

    def take(m: re.Match) -> str:
        subs.append(m.group(1))
        return " $SUBST "

    text = re.sub(r"\$\(([^()]*)\)", take, text)
    text = re.sub(r"`([^`]*)`", take, text)
    groups, cur = [], []
    for w in _split_words(text):
        if w in SEPARATORS:
            groups.append(cur)
            cur = []
        else:
            cur.append(w)
    groups.append(cur)
    for s in subs:
        groups += simple_commands(s)
    return [g for g in groups if g]


def _strip_prefix(words: list[str]) -> list[str]:
    """Drop leading VAR=value assignments and wrappers such as `time`, `env`."""
    i = 0
    while i < len(words) and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[i]) or words[i] in PREFIX_WORDS):
        i += 1
    return words[i:]


def _is_python(word: str) -> bool:
    return bool(re.fullmatch(r"(?:\S*/)?python(?:3(?:\.\d+)?)?", word))


def _is_placeholder(word: str) -> bool:
    return word.startswith(("$", "<", "{")) or word in {"...", "…"}


# ---------------------------------------------------------------- rime's parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    if parser._subparsers is None:
        return {}
    for action in parser._subparsers._group_actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _option_ok(word: str, parser: argparse.ArgumentParser) -> bool:
    return word.split("=", 1)[0] in parser._option_string_actions


def _looks_like_option(word: str) -> bool:
    return word.startswith("-") and word not in {"-", "--"} and not re.match(r"^-\d", word)


def _takes_value(word: str, parser: argparse.ArgumentParser) -> bool:
    action = parser._option_string_actions.get(word)
    return action is not None and "=" not in word and action.nargs != 0


def check_rime(words: list[str], parser: argparse.ArgumentParser, prog: str = "rime") -> list[str]:
    """Problems of one `rime ...` argument list: unknown subcommands (at every level) and options."""
    problems, path, cur = [], prog, parser
    expect_sub = bool(_subparsers(cur))
    i = 0
    while i < len(words):
        w = words[i].strip("[]")  # `[--rebuild]` in a usage line
        if not w or _is_placeholder(w):
            if expect_sub:  # `rime $CMD ...`: which parser the rest belongs to is unknown
                return problems
            i += 1
            continue
        if _looks_like_option(w):
            if not _option_ok(w, cur):
                problems.append(f"`{path}` has no option {w.split('=', 1)[0]}")
            i += 2 if _takes_value(w, cur) else 1  # skip its value (which may itself start with '-')
            continue
        if expect_sub:
            subs = _subparsers(cur)
            if w not in subs:
                problems.append(f"`{path}` has no subcommand {w!r} (choices: {', '.join(subs)})")
                return problems
            path, cur = f"{path} {w}", subs[w]
            expect_sub = bool(_subparsers(cur))
        i += 1
    if expect_sub:
        problems.append(f"`{path}` needs a subcommand ({', '.join(_subparsers(cur))})")
    return problems


# ---------------------------------------------------------------- bench scripts


def bench_options(script: Path) -> set[str] | None:
    """Option strings of a bench script's argparse, read statically; None if it declares none."""
    tree = ast.parse(script.read_text(encoding="utf-8"))
    opts = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            opts |= {
                a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith("-")
            }
    return (opts | {"-h", "--help"}) if opts else None


def check_script(words: list[str], root: Path) -> list[str]:
    """`bash X.sh` / `python X.py`: the file exists; a bench script's options exist."""
    target = next((w for w in words[1:] if not _looks_like_option(w)), None)
    if target is None or _is_placeholder(target) or not target.endswith((".sh", ".py")):
        return []
    script = root / target
    if not script.is_file():
        return [f"{target}: no such file"]
    if target.startswith("bench/") and target.endswith(".py"):
        opts = bench_options(script)
        if opts is not None:
            args = words[words.index(target) + 1 :]
            return [
                f"{target} has no option {a.split('=', 1)[0]}"
                for a in (x.strip("[]") for x in args)
                if _looks_like_option(a) and a.split("=", 1)[0] not in opts
            ]
    return []


def check_command(cmd: Command, parser: argparse.ArgumentParser, root: Path = ROOT) -> list[str]:
    problems = []
    for words in simple_commands(cmd.text):
        words = _strip_prefix(words)
        if not words:
            continue
        head = words[0]
        if head == "rime" or head.endswith("/rime"):
            problems += check_rime(words[1:], parser)
        elif _is_python(head) and words[1:3] == ["-m", "orchestrator.cli"]:
            problems += check_rime(words[3:], parser, prog="python -m orchestrator.cli")
        elif (head in {"bash", "sh"} or _is_python(head)) and not (len(words) > 1 and words[1] == "-m"):
            problems += check_script(words, root)
    return [f"{cmd.where}: {p}\n    {cmd.text}" for p in problems]


def command_problems(files: list[Path], parser: argparse.ArgumentParser, root: Path = ROOT) -> list[str]:
    return [p for f in files for c in commands_in(f, root) for p in check_command(c, parser, root)]


# ---------------------------------------------------------------- links

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose_lines(text: str, keep_code: bool = False) -> list[tuple[int, str]]:
    """Lines outside fenced blocks, inline code removed (kept with keep_code)."""
    out, fence = [], None
    for n, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*(`{3,}|~{3,})", line)
        if fence is None and m:
            fence = m.group(1)
            continue
        if fence is not None:
            if line.strip().startswith(fence):
                fence = None
            continue
        out.append((n, line if keep_code else re.sub(r"(`+)(?:(?!\1).)+\1", "", line)))
    return out


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings: rendered text, lowercased, punctuation dropped,
    spaces to hyphens, repeats numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    for _, line in _prose_lines(path.read_text(encoding="utf-8"), keep_code=True):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # a link's text
        text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        seen.setdefault(f"{slug}-{n}" if n else slug, 1)
    return set(seen)


def link_problems(files: list[Path], root: Path = ROOT) -> list[str]:
    """Relative links whose file is missing, or whose #anchor names no heading of a markdown target."""
    problems = []
    for f in files:
        for n, line in _prose_lines(f.read_text(encoding="utf-8")):
            for m in LINK.finditer(line):
                target = m.group(1)
                if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
                    continue  # http(s), mailto, ...; an anchor in the same file
                path, _, anchor = target.partition("#")
                dest = f.parent / path.split("?", 1)[0]
                where = f"{_rel(f, root)}:{n}"
                if not dest.exists():
                    problems.append(f"{where}: broken link {target!r} (no {_rel(dest.resolve(), root)})")
                elif anchor and dest.is_file() and dest.suffix == ".md" and anchor not in heading_anchors(dest):
                    problems.append(f"{where}: broken link {target!r} (no heading #{anchor} in {_rel(dest.resolve(), root)})")
    return problems


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    from orchestrator.cli import build_parser

    return build_parser()


def test_doc_files_found():
    names = {_rel(f, ROOT) for f in doc_files()}
    assert "README.md" in names and any(n.startswith("docs/") for n in names), names


def test_readme_is_short():
    size = (ROOT / "README.md").stat().st_size
    assert size < README_LIMIT, f"README.md is {size} bytes; keep it under {README_LIMIT} (move detail to docs/)"


def test_doc_commands_exist(parser):
    problems = command_problems(doc_files(), parser)
    assert not problems, "commands in the docs that would fail:\n" + "\n".join(problems)


def test_doc_commands_are_checked(parser):
    """The checker sees the commands it is meant to (a parse bug must not pass every doc vacuously)."""
    seen = [c for f in doc_files() for c in commands_in(f) if re.search(r"(^|[\s/])rime\s", c.text)]
    assert len(seen) >= 10, seen


def test_doc_links_resolve():
    problems = link_problems(doc_files())
    assert not problems, "broken relative links:\n" + "\n".join(problems)


def test_checkers_report_mistakes(parser, tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "b.py").write_text("import argparse\nap = argparse.ArgumentParser()\nap.add_argument('--n')\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("# there\n")
    doc = tmp_path / "docs" / "bad.md"
    doc.write_text(
        "# bad\n\n"
        "```bash\n"
        "rime trian x\n"
        ".venv/bin/rime train configs/tiny-cpu.yaml \\\n"
        "    --no-such-flag  # comment\n"
        "rime data synht --out d\n"
        "ray start --head && rime jobs list --adress http://h:8265\n"
        "python -m orchestrator.cli eval --data d --querymode disc\n"
        "echo $(rime profile p --set-all)\n"
        "bash scripts/nope.sh\n"
        "python bench/b.py --n 3 --m 4\n"
        "rime data\n"
        "```\n\n"
        "```bash\n"
        "rime train c.yaml --set cma.steps=5 --resume   # all real\n"
        "MLFLOW_TRACKING_URI=x rime eval --model $M --data <dir> | tee out\n"
        "python bench/b.py --n 3\n"
        "```\n\n"
        "[ok](there.md#there) [bad anchor](there.md#nowhere) [web](https://example.com/x.md) [anchor](#bad) [gone](missing.md) "
        "![img](../pics/none.png) `[code](not-a-link.md)`\n"
    )
    cmd = command_problems([doc], parser, root=tmp_path)
    text = "\n".join(cmd)
    assert "docs/bad.md:4: `rime` has no subcommand 'trian'" in text
    assert "docs/bad.md:5: `rime train` has no option --no-such-flag" in text
    assert "`rime data` has no subcommand 'synht'" in text
    assert "`rime jobs list` has no option --adress" in text
    assert "`python -m orchestrator.cli eval` has no option --querymode" in text
    assert "`rime profile` has no option --set-all" in text
    assert "scripts/nope.sh: no such file" in text
    assert "bench/b.py has no option --m" in text
    assert "`rime data` needs a subcommand" in text
    assert len(cmd) == 9, text  # and nothing from the all-real block
    links = link_problems([doc], root=tmp_path)
    assert len(links) == 3, links
    assert "docs/bad.md:22: broken link 'there.md#nowhere' (no heading #nowhere in docs/there.md)" in links[0]
    assert "docs/bad.md:22: broken link 'missing.md'" in links[1] and "../pics/none.png" in links[2]
