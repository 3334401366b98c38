"""The options registry: one place, typed, with errors that list what is allowed."""
import pytest

from seqpar_compiler.options import OPTIONS, get_option, options_table, resolve_options


def test_every_design_option_is_registered_with_help():
    for name in ("degree", "schedule", "checkpoint", "ffn_chunks", "kernel", "output", "fallback",
                 "grad_reduce", "overlap", "check_inputs", "inner", "dump"):
        assert name in OPTIONS and OPTIONS[name].help


@pytest.mark.parametrize("value,expected", [("1", True), ("off", False), ("TRUE", True), ("0", False)])
def test_booleans_accept_1_0_true_false_on_off(monkeypatch, value, expected):
    monkeypatch.setenv("SEQPAR_OVERLAP", value)
    assert get_option("overlap") is expected


def test_bad_env_value_names_the_variable_and_the_allowed_values(monkeypatch):
    monkeypatch.setenv("SEQPAR_SCHEDULE", "spiral")
    with pytest.raises(ValueError, match=r"SEQPAR_SCHEDULE.*allowed: ring, zigzag, striped, distflash"):
        get_option("schedule")


def test_bad_bool_and_int_values_are_errors(monkeypatch):
    monkeypatch.setenv("SEQPAR_OVERLAP", "maybe")
    with pytest.raises(ValueError, match="1/0/true/false/on/off"):
        get_option("overlap")
    with pytest.raises(ValueError, match="int >= 1"):
        get_option("ffn_chunks", 0)


def test_keyword_overrides_env_and_unknown_names_are_errors(monkeypatch):
    monkeypatch.setenv("SEQPAR_KERNEL", "math")
    assert resolve_options(kernel="aten")["kernel"] == "aten"
    assert resolve_options()["kernel"] == "math"
    with pytest.raises(ValueError, match="unknown seqpar option"):
        resolve_options(shedule="ring")


def test_options_table_lists_every_env_var():
    table = options_table()
    for opt in OPTIONS.values():
        assert f"`{opt.env}`" in table


def test_readme_options_table_is_generated_from_the_registry():
    import pathlib
    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    start = readme.index("<!-- options-table")
    block = readme[readme.index("\n", start) + 1:readme.index("<!-- /options-table -->")]
    assert block.strip() == options_table().strip(), "run `python -m seqpar_compiler.options` and paste"


def test_unknown_seqpar_variable_warns_with_the_closest_option(monkeypatch):
    from seqpar_compiler import options
    monkeypatch.setattr(options, "_warned_unknown", set())
    env = {"SEQPAR_SCHEDUEL": "ring", "SEQPAR_SCHEDULE": "zigzag"}
    with pytest.warns(options.SeqparOptionWarning, match=r"SEQPAR_SCHEDUEL='ring' is not a seqpar option.*"
                                                         r"did you mean SEQPAR_SCHEDULE\?"):
        values = options.check_environment(env)
    assert values["schedule"] == "zigzag"           # the typo is ignored, said so, and the rest is read


def test_every_bad_value_is_reported_at_once_first_line_first():
    env = {"SEQPAR_SCHEDULE": "zigzig", "SEQPAR_FFN_CHUNKS": "0", "SEQPAR_KERNEL": "aten"}
    with pytest.raises(ValueError) as info:
        from seqpar_compiler.options import check_environment
        check_environment(env, warn=False)
    lines = str(info.value).splitlines()
    assert lines[0] == f"bad value 'zigzig' for SEQPAR_SCHEDULE; allowed: {OPTIONS['schedule'].allowed()}"
    assert lines[1] == "bad value '0' for SEQPAR_FFN_CHUNKS; allowed: int >= 1" and len(lines) == 2


def test_every_seqpar_name_in_the_code_is_a_registered_option():
    """Names the code reads or sets (the dump tool, launchers, docs) must not trip the unknown-name
    warning: each is an option or listed in options._NOT_OPTIONS."""
    import pathlib
    import re
    from seqpar_compiler import options
    root = pathlib.Path(__file__).parents[2]
    names = set()
    for folder in ("seqpar_compiler", "passes", "runtime", "kernels", "examples", "bench"):
        for path in (root / folder).rglob("*.py"):
            names |= set(re.findall(r"\bSEQPAR_[A-Z][A-Z_]*[A-Z]\b", path.read_text()))
    known = {o.env for o in options.OPTIONS.values()} | options._NOT_OPTIONS
    assert names and names <= known, sorted(names - known)
