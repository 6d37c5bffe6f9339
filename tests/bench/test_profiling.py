"""The py-spy recording summaries of ``python -m bench.profiling``."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.profiling import callees, main, summarize

# collapsed stacks as py-spy writes them: outermost frame first, then the sample count
_FOLDED = """\
run (asyncio/runners.py:1);handle (controller/correlator.py:10);commit (controller/store.py:20) 6
run (asyncio/runners.py:1);handle (controller/correlator.py:10);transition (controller/state_machine.py:30) 3
run (asyncio/runners.py:1);handle (controller/correlator.py:11) 1
run (asyncio/runners.py:1);select (lib/selectors.py:40) 10
"""


@pytest.fixture
def folded(tmp_path: Path) -> Path:
    path = tmp_path / "controller.folded"
    path.write_text(_FOLDED)
    return path


def test_summary_counts_self_and_inclusive_samples(folded: Path) -> None:
    lines = summarize(folded).splitlines()
    assert lines[0] == "controller.folded: 20 samples"
    rows = {name: (float(own), float(incl)) for own, incl, name in (line.split(None, 2) for line in lines[2:])}
    assert rows["select (lib/selectors.py)"] == (50.0, 50.0)
    assert rows["commit (controller/store.py)"] == (30.0, 30.0)
    assert rows["handle (controller/correlator.py)"] == (5.0, 50.0)  # one sample of its own, ten below it


def test_callees_split_a_function_by_what_it_calls(folded: Path) -> None:
    lines = callees(folded, "handle").splitlines()
    assert lines[0] == "controller.folded: handle in 50.0% of 20 samples"
    assert [line.split(None, 1) for line in lines[2:]] == [
        ["30.0", "commit (controller/store.py)"],
        ["15.0", "transition (controller/state_machine.py)"],
        ["5.0", "(its own code)"],
    ]
    assert callees(folded, "nowhere") == "controller.folded: no samples under 'nowhere'"


def test_cli_prints_either_view_and_refuses_a_missing_file(
    folded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main([str(folded), "--top", "1"])
    assert capsys.readouterr().out.splitlines()[2].endswith("select (lib/selectors.py)")
    main([str(folded), "--under", "handle"])
    assert "handle in 50.0%" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main([str(tmp_path / "missing.folded")])
    assert exited.value.code == 2
    assert "no such file" in capsys.readouterr().err
