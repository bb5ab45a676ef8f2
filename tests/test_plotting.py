"""fedscore.plotting: matplotlib only when something is drawn, and then with Agg."""

import subprocess
import sys

from fedscore import plotting


def test_importing_the_library_does_not_import_matplotlib():
    code = ("import sys, fedscore.data, fedscore.runs.plots, fedscore.runs.report, "
            "fedscore.theory.report; print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_pyplot_draws_with_agg_and_figure_needs_no_pyplot(tmp_path):
    plt = plotting.pyplot()
    assert plotting.pyplot() is plt and plt.get_backend().lower() == "agg"
    fig = plotting.figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    fig.savefig(tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
