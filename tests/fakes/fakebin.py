"""Entry point of the fake executables in bin/: ``fakebin.py NAME ARGS...`` runs fake NAME.

bin/srun, bin/scontrol, bin/squeue, bin/sinfo, bin/scancel and bin/ssh are two-line shell
scripts that run this file with $FAKE_PYTHON (the tests set it to their own interpreter).
Every fake appends its argv to $FAKE_SLURM_DIR/calls.log; see common.py for the shared state,
fake_slurm.py and fake_ssh.py for what each does and the switches that change it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fake_slurm
import fake_ssh

COMMANDS = {**fake_slurm.COMMANDS, "ssh": fake_ssh.main}

if __name__ == "__main__":
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
