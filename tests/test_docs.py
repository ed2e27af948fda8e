"""The docs against the code: a docs page that drifts from the package fails here.

- every `trl-opsdl ...` line in a bash block of README.md or docs/*.md parses with the real command-line parser (and
  the arguments of `trl-opsdl train` / `examples/scripts/opsdl.py` with TRL's parser over the script's dataclasses);
  nothing is run;
- every relative link in README.md, CONTRIBUTING.md, CHANGELOG.md and docs/ (research log included) points at a file
  that exists, and a `#anchor` into a Markdown file at one of its headings;
- every field `OPSDLConfig` adds to TRL's `DistillationConfig` has a row in docs/trainer.md's table, and every row is a field;
- README's Python snippet runs as written on a tiny local model (only its `model = "..."` line is swapped).
"""

import argparse
import dataclasses
import os
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest


ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
COMMAND_PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK_PAGES = [README, ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def fenced_blocks(text: str, language: str):
    return [body for lang, body in FENCE.findall(text) if lang == language]


def shell_commands(block: str):
    """The simple commands of a bash block: continuation lines joined, comments dropped, split at && ; and |."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        current = []
        for token in tokens + ["&&"]:
            if token in ("&&", ";", "|", "||"):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token)
    return commands


def documented_command_lines():
    """(page, tokens) for each `trl-opsdl`, `-m trl_opsdl.cli` or `examples/scripts/opsdl.py` command in a bash block."""
    found = []
    for page in COMMAND_PAGES:
        for block in fenced_blocks(page.read_text(), "bash"):
            for tokens in shell_commands(block):
                for i, token in enumerate(tokens):
                    if token == "trl-opsdl" or (token == "trl_opsdl.cli" and tokens[i - 1] == "-m"):
                        found.append((page.relative_to(ROOT), ["trl-opsdl", *tokens[i + 1 :]]))
                        break
                    if token.endswith("examples/scripts/opsdl.py"):
                        found.append((page.relative_to(ROOT), ["opsdl.py", *tokens[i + 1 :]]))
                        break
    return found


class _Captured(Exception):
    pass


def exact_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """No abbreviations, in the parser and its subcommands: a doc's `--num-samples` must not pass as the prefix of a
    renamed `--num-samples-per-task`."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                exact_options(subparser)
    return parser


def cli_parser() -> argparse.ArgumentParser:
    """The parser `trl-opsdl` itself builds: taken from `trl_opsdl.cli.main` as it starts to parse (nothing runs)."""
    from trl_opsdl import cli

    if hasattr(cli, "build_parser"):
        return exact_options(cli.build_parser())
    captured = {}

    def capture(self, *args, **kwargs):
        captured["parser"] = self
        raise _Captured

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", capture):
        with pytest.raises(_Captured):
            cli.main(["--help"])
    return exact_options(captured["parser"])


def parse_train_arguments(argv):
    """TRL's parser over `ScriptArguments`, `OPSDLConfig` and `ModelConfig`, as `trl-opsdl train` uses it."""
    from trl_opsdl.train import make_parser

    parser = make_parser(prog="trl-opsdl train")
    parser.allow_abbrev = False
    parser.parse_args_and_config(argv)


COMMANDS = documented_command_lines()


def test_the_docs_hold_commands_to_check():
    pages = {page for page, _ in COMMANDS}
    assert len(COMMANDS) >= 30 and Path("README.md") in pages and Path("docs/cli.md") in pages


@pytest.mark.parametrize("page,tokens", COMMANDS, ids=[f"{p}:{' '.join(t)[:60]}" for p, t in COMMANDS])
def test_documented_command_parses(page, tokens, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a `--config FILE` or an output folder must not touch the checkout
    line = " ".join(tokens)
    try:
        if tokens[0] == "opsdl.py":
            parse_train_arguments(tokens[1:])
            return
        args, extra = cli_parser().parse_known_args(tokens[1:])
        if extra and not getattr(args, "accepts_extra", False):
            pytest.fail(f"{page}: `{line}`: unrecognized arguments {extra}")
        if args.command == "train":
            parse_train_arguments(extra)
    except SystemExit as exit_:
        if exit_.code not in (0, None):  # `--help` exits 0
            pytest.fail(f"{page}: `{line}` does not parse:\n{capsys.readouterr().err}")


# ---- links -------------------------------------------------------------------------------------------------------


def github_anchors(markdown: str) -> set:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens, -1 on repeats."""
    anchors, seen = set(), {}
    text = re.sub(FENCE, "", markdown)
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def relative_links(page: Path):
    text = re.sub(FENCE, "", page.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans may hold `](` without being links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


LINKS = [(page, target) for page in LINK_PAGES if page.exists() for target in relative_links(page)]


def test_the_docs_hold_links_to_check():
    assert len(LINKS) >= 50


@pytest.mark.parametrize("page,target", LINKS, ids=[f"{p.relative_to(ROOT)}->{t}" for p, t in LINKS])
def test_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    resolved = (page.parent / path).resolve() if path else page
    where = f"{page.relative_to(ROOT)} links to {target}"
    assert resolved.exists(), f"{where}: {resolved} does not exist"
    if anchor and resolved.suffix == ".md":
        assert anchor in github_anchors(resolved.read_text()), f"{where}: no heading with that anchor"


# ---- OPSDLConfig fields ------------------------------------------------------------------------------------------


def opsdl_config_fields() -> set:
    """The fields `OPSDLConfig` adds to TRL's `DistillationConfig`."""
    from trl.experimental.distillation import DistillationConfig

    from trl_opsdl import OPSDLConfig

    return {f.name for f in dataclasses.fields(OPSDLConfig)} - {f.name for f in dataclasses.fields(DistillationConfig)}


def documented_fields() -> set:
    """The fields with a row in docs/trainer.md's `OPSDLConfig` table: lines `| `name` | type, default | meaning |`."""
    page = (ROOT / "docs" / "trainer.md").read_text()
    table = page.split("### `OPSDLConfig(DistillationConfig)`", 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^\| `(\w+)` \|", table, re.M))


def test_every_opsdl_config_field_has_a_row_in_trainer_md():
    fields = opsdl_config_fields()
    assert len(fields) >= 10
    missing = sorted(fields - documented_fields())
    assert not missing, f"OPSDLConfig fields without a row in docs/trainer.md's OPSDLConfig table: {missing}"


def test_every_row_of_trainer_md_is_an_opsdl_config_field():
    stale = sorted(documented_fields() - opsdl_config_fields())
    assert not stale, f"docs/trainer.md documents OPSDLConfig fields that do not exist: {stale}"


# ---- README snippet ------------------------------------------------------------------------------------------------

MODEL_LINE = re.compile(r'^model = "[^"]+"', re.M)


def readme_snippet() -> str:
    blocks = fenced_blocks(README.read_text(), "python")
    assert blocks, "README.md has no python block"
    return blocks[0]


def test_readme_snippet_names_its_model_on_one_line():
    assert len(MODEL_LINE.findall(readme_snippet())) == 1, 'README\'s snippet must set `model = "..."` on one line'


def test_readme_snippet_runs_on_a_tiny_model(tmp_path, monkeypatch):
    from tests.conftest import bpe_tokenizer, tiny_model

    snippet = readme_snippet()
    texts = re.findall(r'"([^"]{3,})"', snippet)  # the snippet's own words, so the tokenizer has them
    tokenizer = bpe_tokenizer(texts * 20, chatml=True)
    model_dir = tmp_path / "tiny-model"
    tiny_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DISABLED", "true")
    code = MODEL_LINE.sub(lambda _: f"model = {str(model_dir)!r}", snippet)
    namespace = {"__name__": "readme_snippet"}
    exec(compile(code, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step >= 1
    assert os.path.isdir(tmp_path / trainer.args.output_dir)
