"""The README's two commands are what CI runs and what a newcomer types."""
import pathlib
import re

ROOT = pathlib.Path(__file__).parents[2]


def _commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## The two commands")
    section = readme[start:readme.index("\n## ", start + 1)]
    return [c.strip() for c in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_readme_has_two_commands_that_start_in_a_fresh_virtual_environment():
    commands = _commands()
    assert len(commands) == 2
    for cmd in commands:
        assert cmd.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && ")
    assert commands[0].endswith("python examples/train_long_context.py")
    assert commands[1].endswith("python -m pytest -q")


def test_ci_runs_the_readme_test_command_as_written():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _commands()[1] in ci
