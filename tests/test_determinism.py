"""The demo's optional portable kernels (--portable-kernels): chosen before torch loads, reported honestly after."""

import os
import subprocess
import sys
from pathlib import Path

from mu_fast.determinism import PORTABLE_KERNELS, kernel_settings, use_portable_kernels

REPO = Path(__file__).resolve().parents[1]


def test_portable_kernels_take_effect_in_a_fresh_process():
    code = ("from mu_fast.determinism import use_portable_kernels, kernel_settings\n"
            "assert use_portable_kernels()\n"
            "import torch\n"
            "s = kernel_settings()\n"
            "assert s['portable'] and s['torch_cpu_capability'] == 'DEFAULT' and s['MKL_CBWR'] == 'COMPATIBLE', s\n")
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_KERNELS}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_after_torch_loaded_they_are_reported_as_not_in_effect(monkeypatch):
    import torch  # noqa: F401 (loaded, as in any test process)

    for key in PORTABLE_KERNELS:
        monkeypatch.delenv(key, raising=False)
    assert use_portable_kernels() is False  # torch is loaded: nothing can change any more
    assert all(os.environ.get(k) is None for k in PORTABLE_KERNELS)
    assert kernel_settings()["portable"] is False


def test_the_demo_command_gets_portable_kernels_through_the_entry_point():
    """`mu-fast demo --portable-kernels` builds its flags from EditConfig (which loads torch) when mu_fast.cli is
    imported: the kernels must be chosen before that, from the command line, or the demo silently runs this CPU's
    own kernels. Without the flag the demo runs this CPU's own (the default)."""
    code = ("import sys\n"
            "sys.argv = ['mu-fast'] + sys.argv[1:]\n"
            "import mu_fast.cli\n"
            "from mu_fast.determinism import kernel_settings\n"
            "print(kernel_settings()['portable'])\n")
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_KERNELS}
    env["PYTHONPATH"] = str(REPO)
    seen = {}
    for args in (["demo", "--portable-kernels", "--help"], ["--debug", "demo", "--portable-kernels"], ["demo"],
                 ["demo", "--native-kernels"], ["run", "organism"]):
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        seen[" ".join(args)] = proc.stdout.strip()
    assert seen == {"demo --portable-kernels --help": "True", "--debug demo --portable-kernels": "True",
                    "demo": "False", "demo --native-kernels": "False", "run organism": "False"}
