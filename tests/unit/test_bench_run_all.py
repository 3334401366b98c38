"""bench/run_all.py finds every benchmark, runs each at its quick size and renders its JSON."""
import importlib.util
import json
import pathlib

BENCH = pathlib.Path(__file__).parents[2] / "bench"
_spec = importlib.util.spec_from_file_location("run_all", BENCH / "run_all.py")
run_all = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_all)


def test_discovers_every_benchmark_script_but_itself():
    names = run_all.discover()
    assert {"ring_attention", "train_step", "kernels_gpu"} <= set(names)
    assert "run_all" not in names
    assert set(names) == {p.stem for p in BENCH.glob("*.py") if p.stem != "run_all" and not p.stem.startswith("_")}


def test_quick_runs_pass_each_scripts_quick_flag_and_write_beside_the_full_results():
    for name in ("ring_attention", "train_step", "kernels_gpu"):
        cmd, out, note = run_all.command_for(name, quick=True)
        assert "--quick" in cmd and not note, (name, cmd)
        assert out.endswith(f"{name}.quick.json") and out.endswith(cmd[cmd.index("--out") + 1])
        full_cmd, full_out, _ = run_all.command_for(name, quick=False)
        assert "--quick" not in full_cmd and full_out.endswith(f"{name}.json")


def test_renders_meta_and_every_list_of_records_as_a_table(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"meta": {"machine": "m1", "cpus": 2, "torch": "2.13", "date": "2026-11-22",
                                         "command": "python bench/b.py"},
                                "rows": [{"S": 4096, "speedup": 1.8312}, {"S": 8192, "speedup": 1.46}],
                                "other": [{"k": "x"}]}))
    text = "\n".join(run_all.render_json(str(path)))
    assert "m1" in text and "2026-11-22" in text and "`python bench/b.py`" in text
    assert "| S | speedup |" in text and "| 4096 | 1.83 |" in text and "| 8192 | 1.46 |" in text
    assert "`other`:" in text and "| x |" in text
