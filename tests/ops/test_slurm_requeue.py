"""SLURM requeue, simulated: a training task under a SLURM environment gets SIGUSR1 (what `--signal=SIGUSR1@90`
sends before the time limit), writes its requeue checkpoint at the next batch boundary and calls `scontrol requeue
<job id>` (a stand-in on PATH that records the call and kills the job, as SLURM ends a requeued job's tasks);
launched again with the same command, the job resumes from that checkpoint in the same run directory and finishes
with the weights of an uninterrupted run."""

import os
import signal
import stat
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from ops_helpers import ROOT, cli_env, finish, launch, run_cli, tiny_experiment

pytestmark = pytest.mark.slow

SCONTROL = """#!/bin/sh
echo "$@" >> "$SCONTROL_LOG"
kill -KILL $PPID
"""


def test_sbatch_template_launches_cli_fit_with_requeue_settings():
    template = (ROOT / "configs" / "slurm" / "train.sbatch").read_text()
    for line in ("#SBATCH --signal=SIGUSR1@90", "#SBATCH --requeue", "#SBATCH --ntasks-per-node=",
                 '"$PY" cli.py fit', '--trainer.devices "$SLURM_NTASKS_PER_NODE"', "--ckpt_path auto"):
        assert line in template
    assert (ROOT / "configs" / "slurm" / "README.md").is_file()
    # SLURM opens the log before the script runs: it cannot be in a directory a fresh clone lacks (runs/ is ignored)
    output = next(line.split("=", 1)[1] for line in template.splitlines() if line.startswith("#SBATCH --output="))
    assert "/" not in output



def run_template(tmp_path, **env):
    """The sbatch script under bash with a stand-in srun that prints its arguments (cwd: tmp_path)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text('#!/bin/sh\necho "srun $*"\n')
    (bin_dir / "srun").chmod(stat.S_IRWXU)
    environment = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NAME": "lvlm-prune",
                   "SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "1", **env}
    return subprocess.run(["bash", str(ROOT / "configs" / "slurm" / "train.sbatch"), "exp.yaml", "--seed_everything",
                           "3"], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=30)


def test_the_sbatch_script_picks_its_python_and_run_directory_and_names_missing_settings(tmp_path):
    slurm = {"SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "4"}
    done = run_template(tmp_path, **slurm)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("srun --cpus-per-task=4 python cli.py fit --config exp.yaml --seed_everything 3 ")
    assert "--trainer.devices 2 --trainer.default_root_dir runs/slurm/lvlm-prune-77 " in done.stdout
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").write_text("#!/bin/sh\n")
    (tmp_path / ".venv" / "bin" / "python").chmod(stat.S_IRWXU)
    # the checkout's environment, and a run directory given at submission (to continue a run in a new job)
    done = run_template(tmp_path, RUN_DIR="runs/slurm/rcp-a", **slurm)
    assert "srun --cpus-per-task=4 .venv/bin/python cli.py fit" in done.stdout
    assert "--trainer.default_root_dir runs/slurm/rcp-a " in done.stdout and (tmp_path / "runs/slurm/rcp-a").is_dir()
    assert "srun --cpus-per-task=4 /opt/py cli.py" in run_template(tmp_path, PY="/opt/py", **slurm).stdout
    missing = run_template(tmp_path, SLURM_CPUS_PER_TASK="4")
    assert missing.returncode != 0
    assert "SLURM_NTASKS_PER_NODE: set #SBATCH --ntasks-per-node to the GPUs per node" in missing.stderr


def test_every_srun_of_the_sbatch_templates_passes_the_cpus_per_task_on():
    # since Slurm 22.05 srun does not take the job's --cpus-per-task: each task would run on one CPU
    for template in (ROOT / "configs" / "slurm").glob("*.sbatch"):
        text = template.read_text()
        sruns = [line for line in text.splitlines() if line.lstrip().startswith("srun ")]
        assert sruns and "#SBATCH --cpus-per-task=" in text, template
        for line in sruns:
            assert ('--cpus-per-task="$SLURM_CPUS_PER_TASK"' in line
                    or 'export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"' in text), (template, line)


REQUEUE_STEP = 6  # mid-epoch: 4 training batches per epoch
MAX_STEPS = 12


def test_requeued_job_resumes_from_its_requeue_checkpoint(tiny_base_dir, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(SCONTROL)
    (bin_dir / "scontrol").chmod(stat.S_IRWXU)
    calls = tmp_path / "scontrol.log"
    env = cli_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SCONTROL_LOG=str(calls), SLURM_JOB_ID="4242",
                  SLURM_JOB_NAME="lvlm-prune", SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_PROCID="0",
                  SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NODELIST="localhost")
    run_dir = tmp_path / "run"
    config = tiny_experiment(run_dir, tiny_base_dir, max_steps=MAX_STEPS, limit_val_batches=0)
    command = ["fit", "--config", str(config), "--ckpt_path", "auto"]
    # SIGUSR1 (what SLURM sends before the time limit) arrives during the training batch that ends at step
    # REQUEUE_STEP: sent by the job to itself from a callback that runs before `SlurmRequeue` in the same hook, so
    # the step it lands at is fixed, not a race with the training speed
    signal_at = ["--trainer.callbacks+=ops_helpers.KillAt", f"--trainer.callbacks.init_args.step={REQUEUE_STEP}",
                 "--trainer.callbacks.init_args.signal_name=SIGUSR1"]

    code, output = finish(launch(command + signal_at, env), timeout=120)
    assert code == -signal.SIGKILL, output[-3000:]  # the stand-in scontrol ended the job, as SLURM does
    assert calls.read_text().split() == ["requeue", "4242"], output[-3000:]
    requeue_checkpoint = run_dir / "hpc_ckpt_1.ckpt"
    assert torch.load(requeue_checkpoint, weights_only=False)["global_step"] == REQUEUE_STEP
    # the job was ended inside the requeue hook, before the every-step checkpoint of that batch: `last.ckpt` is one
    # step older, and resuming must pick the newer requeue checkpoint
    last = run_dir / "logs" / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == REQUEUE_STEP - 1
    assert not (run_dir / "plugin.safetensors").exists(), "the first launch ran to the end"

    output = run_cli(command + signal_at, env=env)  # launched again with the same command
    assert f"--ckpt_path auto: resuming from {requeue_checkpoint}" in output
    assert calls.read_text().split() == ["requeue", "4242"], "the resumed job was requeued again"
    assert torch.load(last, weights_only=False)["global_step"] == MAX_STEPS
    assert (run_dir / "plugin.safetensors").exists()

    # the requeue checkpoint was written between batches (`SlurmRequeue`), so the requeued job ends exactly as an
    # uninterrupted one
    reference_dir = tmp_path / "reference"
    reference = tiny_experiment(reference_dir, tiny_base_dir, max_steps=MAX_STEPS, limit_val_batches=0)
    run_cli(["fit", "--config", str(reference)])
    expected, resumed = load_file(reference_dir / "plugin.safetensors"), load_file(run_dir / "plugin.safetensors")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


class SignalledInAWorker(torch.utils.data.Dataset):
    """One item, made in a DataLoader worker after SLURM's requeue signal reached that worker (SLURM signals every
    process of the job step)."""

    def __len__(self):
        return 1

    def __getitem__(self, index):
        os.kill(os.getpid(), signal.SIGUSR1)
        return index


def test_dataloader_workers_inherit_the_requeue_handler_and_survive_the_signal():
    from types import SimpleNamespace

    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from callbacks.requeue import SlurmRequeue

    environment = SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR1)
    trainer = SimpleNamespace(_accelerator_connector=SimpleNamespace(cluster_environment=environment))
    callback, before = SlurmRequeue(), signal.getsignal(signal.SIGUSR1)
    callback.setup(trainer, None, "fit")  # Lightning forks the first epoch's workers after setup, before training
    try:
        loader = torch.utils.data.DataLoader(SignalledInAWorker(), num_workers=1, batch_size=None)
        assert list(loader) == [0]  # with the default action the worker dies and the loader raises
    finally:
        callback.teardown(trainer, None, "fit")
    assert signal.getsignal(signal.SIGUSR1) == before and not environment.auto_requeue
