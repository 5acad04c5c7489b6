"""Every command line the README and the package's messages print parses: `dust3r-ns ...` through the CLI's own
parser (`dust3r_ns.cli.parse`, which runs nothing), `ns-train/ns-eval/ns-export/ns-viewer ...` through nerfstudio's
own entry points with tyro stopped right after parsing (a subprocess with the plugin registered). CI runs exactly
the README's test command."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dust3r_ns import cli, pipeline

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PROGRAMS = ("dust3r-ns", "ns-train", "ns-eval", "ns-export", "ns-viewer")
NS_ENTRYPOINTS = {"ns-train": "nerfstudio.scripts.train", "ns-eval": "nerfstudio.scripts.eval",
                  "ns-export": "nerfstudio.scripts.exporter", "ns-viewer": "nerfstudio.scripts.viewer.run_viewer"}


def readme_blocks() -> list[str]:
    """The bash code blocks of README.md."""
    return re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)


def readme_commands() -> list[str]:
    """Every command of the README's bash blocks that starts with one of PROGRAMS (comments dropped, `&&` chains
    split)."""
    found = []
    for block in readme_blocks():
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.split(" ", 1)[0] in PROGRAMS:
                    found.append(part)
    return found


def message_commands(text: str) -> list[str]:
    """Command lines quoted in a message: backtick spans that start with one of PROGRAMS and carry an option."""
    spans = re.findall(r"`((?:%s) [^`]+)`" % "|".join(map(re.escape, PROGRAMS)), text)
    return [s for s in spans if " --" in s]


def bundled_model_note(capsys) -> str:
    pipeline.default_model_source()
    return capsys.readouterr().err


def test_readme_has_the_documented_commands():
    cmds = readme_commands()
    assert len(cmds) >= 15, cmds
    for prog in PROGRAMS:
        assert any(c.startswith(prog + " ") for c in cmds), prog
    # the dataparser options follow the `dust3r` subcommand (tyro rejects --pipeline.datamanager.dataparser.*)
    assert not any("--pipeline.datamanager.dataparser" in c for c in cmds)


def _parse_dust3r_ns(command: str) -> None:
    argv = shlex.split(command)[1:]
    try:
        cli.parse(argv)
    except SystemExit as e:  # tyro's parse error (its message is on stderr)
        pytest.fail(f"`{command}` does not parse (exit {e.code})")


def test_readme_dust3r_ns_commands_parse(capsys):
    cmds = [c for c in readme_commands() if c.startswith("dust3r-ns ")]
    assert len(cmds) >= 10
    for command in cmds:
        _parse_dust3r_ns(command)
    assert "dust3r-ns export scene/reconstruction.npz --out other/ --conf-thr 2" in cmds


def package_commands() -> list[str]:
    """Command lines quoted in the package's sources (messages and docstrings)."""
    return [c for path in sorted((REPO / "dust3r_ns").rglob("*.py")) for c in message_commands(path.read_text())]


def test_message_command_lines_parse(capsys, ns_results):
    """Command lines the package prints (the bundled-model note) and quotes in its messages and docstrings."""
    note = bundled_model_note(capsys)
    note_cmds = message_commands(note)
    assert {c.split()[0] for c in note_cmds} == {"dust3r-ns", "ns-train"}, note
    assert pipeline.REAL_MODEL_NS in note_cmds  # what ns_results parsed
    cmds = note_cmds + package_commands()
    for command in (c for c in cmds if c.startswith("dust3r-ns ")):
        _parse_dust3r_ns(command)
    ns_cmds = [c for c in cmds if not c.startswith("dust3r-ns ")]
    assert len(ns_cmds) >= 3
    _assert_parsed(ns_cmds, ns_results)


NS_PARSE_SCRIPT = r"""
import importlib, json, sys, tyro
real_cli = tyro.cli
class Parsed(Exception):
    pass
def parse_only(*args, **kwargs):
    real_cli(*args, **kwargs)
    raise Parsed
tyro.cli = parse_only
modules, results = json.loads(sys.argv[1]), []
for prog, argv in json.loads(sys.argv[2]):
    sys.argv = [prog] + argv
    try:
        importlib.import_module(modules[prog]).entrypoint()
        results.append("ran past parsing")
    except Parsed:
        results.append("ok")
    except SystemExit as e:
        results.append(f"exit {e.code}")
print("RESULTS " + json.dumps(results))
"""
WRONG_NS = "ns-train dust3r-splatfacto --data photos/ --pipeline.datamanager.dataparser.model x"


def _parse_ns_commands(commands: list[str]) -> tuple[dict[str, str], str]:
    """Parse nerfstudio command lines with nerfstudio's own entry points (tyro.cli stopped after parsing), all in
    one subprocess with the plugin registered; returns ({command: "ok" or "exit N"}, stderr)."""
    env = dict(os.environ)
    env["NERFSTUDIO_METHOD_CONFIGS"] = "dust3r-splatfacto=dust3r_ns.nerfstudio.method:dust3r_splatfacto"
    env["NERFSTUDIO_DATAPARSER_CONFIGS"] = "dust3r=dust3r_ns.nerfstudio.dataparser:dust3r_dataparser"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["COLUMNS"] = "200"
    split = [(c.split()[0], shlex.split(c)[1:]) for c in commands]
    res = subprocess.run([sys.executable, "-c", NS_PARSE_SCRIPT, json.dumps(NS_ENTRYPOINTS), json.dumps(split)],
                         env=env, capture_output=True, text=True, timeout=600)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert res.returncode == 0 and line, res.stdout[-3000:] + res.stderr[-3000:]
    return dict(zip(commands, json.loads(line[0][len("RESULTS "):]))), res.stderr


@pytest.fixture(scope="module")
def ns_results():
    """Every nerfstudio command line of the README, the bundled-model note and the sources, plus a known-wrong one,
    parsed once."""
    pytest.importorskip("nerfstudio")
    cmds = [c for c in readme_commands() + [pipeline.REAL_MODEL_NS] + package_commands() + [WRONG_NS]
            if c.split()[0] in NS_ENTRYPOINTS]
    return _parse_ns_commands(list(dict.fromkeys(cmds)))


def _assert_parsed(commands: list[str], ns_results) -> None:
    results, stderr = ns_results
    bad = [f"`{c}`: {results.get(c, 'not parsed')}" for c in commands if results.get(c) != "ok"]
    assert not bad, "\n".join(bad) + "\n" + stderr[-3000:]


def test_readme_nerfstudio_commands_parse(ns_results):
    cmds = [c for c in readme_commands() if c.split()[0] in NS_ENTRYPOINTS]
    assert {c.split()[0] for c in cmds} == set(NS_ENTRYPOINTS)
    _assert_parsed(cmds, ns_results)


def test_ns_parse_check_can_fail(ns_results):
    """The nerfstudio check rejects the old, wrong dataparser flag form (tyro exits with status 2)."""
    assert ns_results[0][WRONG_NS] == "exit 2"
    with pytest.raises(AssertionError, match="exit 2"):
        _assert_parsed([WRONG_NS], ns_results)


def test_dust3r_ns_parse_check_can_fail():
    with pytest.raises(pytest.fail.Exception):
        _parse_dust3r_ns("dust3r-ns export --recon scene/reconstruction.npz --out other/")


def test_ci_runs_the_readme_test_command():
    """.ci/run executes the README's second command verbatim (so CI installs what the README installs)."""
    test_cmd = readme_blocks()[1].strip()
    assert "python -m pytest -q tests" in test_cmd and "libusb-1.0-0" in test_cmd
    ci_lines = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci_lines
    setup_cmd = readme_blocks()[0].strip()
    assert setup_cmd.split("&& pip install torch")[0] == test_cmd.split("&& pip install torch")[0]
