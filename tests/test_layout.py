"""The form users copy: a SimSiam pretraining runs from four files, pretrain.py, datasets.py, bit_convert.py
and bit_common.py, copied alone into an empty folder; the other methods and the interventions are add-ons that
a run imports only when a flag asks for them; the evaluation scripts need the same shared files and
eval_common.py, what they share."""

import os
import shutil
import subprocess
import sys

import pytest

from helpers import REPO, tiny_args, write_pretrained_backbone

SIMSIAM_FILES = ["pretrain.py", "datasets.py", "bit_convert.py", "bit_common.py"]
SHARED = ["datasets.py", "bit_convert.py", "bit_common.py", "eval_common.py"]

# Runs a script as `python SCRIPT ARGS` does, then prints the files of the folder it ran from that it imported
IMPORTED = """
import os, runpy, sys
script, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    status = e.code
here = os.path.abspath(os.getcwd())
paths = [getattr(m, "__file__", None) or "" for m in list(sys.modules.values())]
files = {os.path.basename(p) for p in paths if os.path.isabs(p) and os.path.dirname(p) == here}
print("status", status)
print("imported", " ".join(sorted(files | {script})))
"""


def imported_files(folder, script, *args):
    """(exit status, the files of `folder` that `python SCRIPT ARGS` run there imported, itself included)."""
    run = subprocess.run(
        [sys.executable, "-c", IMPORTED, script, *map(str, args)],
        cwd=folder,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""},
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = dict(
        line.split(" ", 1) for line in run.stdout.splitlines() if line.startswith(("status", "imported"))
    )
    assert "imported" in lines, run.stdout[-2000:] + run.stderr[-3000:]
    return lines["status"], set(lines["imported"].split()), run.stderr


def one_epoch(tmp_path, *flags):
    """One epoch of 3 steps (90 pretrain images in batches of 30)."""
    args = [*tiny_args(tmp_path, epochs=1), *flags]
    args[args.index("--split") + 1] = "0.05,0.05,0.05,0.85"
    return args


@pytest.mark.script
def test_simsiam_runs_from_the_four_files_copied_into_an_empty_folder(tmp_path):
    """The card's use: copy the script with the files it needs, and run it there."""
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in SIMSIAM_FILES:
        shutil.copy(REPO / name, folder / name)
    status, imported, stderr = imported_files(folder, "pretrain.py", *one_epoch(tmp_path))
    assert status == "0", stderr[-3000:]
    assert imported == set(SIMSIAM_FILES)
    assert (tmp_path / "run" / "backbone.pt").is_file() and (tmp_path / "run" / "metrics.csv").is_file()
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".py") == sorted(SIMSIAM_FILES)


@pytest.mark.script
def test_the_flags_of_the_add_ons_import_exactly_them(tmp_path):
    """In the repository's folder, where every module is at hand: --method simclr reads ssl_methods.py and
    --shrink interventions.py, besides the four files of a SimSiam run and nothing else (one run, both
    flags)."""
    write_pretrained_backbone(tmp_path / "init.pt")
    flags = ["--method", "simclr", "--init", tmp_path / "init.pt", "--shrink", "0.5"]
    status, imported, stderr = imported_files(REPO, "pretrain.py", *one_epoch(tmp_path, *flags))
    assert status == "0", stderr[-3000:]
    assert imported == {*SIMSIAM_FILES, "ssl_methods.py", "interventions.py"}


@pytest.mark.script
@pytest.mark.parametrize(
    "script, needs",
    [
        ("linear_eval.py", SHARED),
        ("tsne.py", SHARED),
        ("finetune.py", [*SHARED, "linear_eval.py"]),
        ("bit_convert.py", ["bit_common.py"]),
    ],
)
def test_the_other_scripts_need_the_files_the_readme_lists(script, needs):
    """linear_eval.py and tsne.py run from themselves and the shared files (eval_common.py included);
    finetune.py imports linear_eval.py's evaluation too; bit_convert.py, the network and its weights, needs
    the plumbing alone. --help builds every flag, so every module-level import happens."""
    status, imported, stderr = imported_files(REPO, script, "--help")
    assert status in ("0", "None"), stderr[-2000:]
    assert imported == {script, *needs}
