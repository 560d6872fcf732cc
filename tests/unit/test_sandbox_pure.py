"""Pure parts of the sandbox: output capping, status mapping, environment scrubbing, limits, reply parsing, and the
isolation levels (what strict, best and none make of the layers a host has)."""

import json
import os
import threading

import pytest

from torl.config import ConfigError, SandboxConfig
from torl.sandbox import scratch
from torl.sandbox.child import Limits, exit_code_of, run_code, snippet_env
from torl.sandbox.client import ZYGOTE_ENV, result_from_reply, zygote_command, zygote_limits
from torl.sandbox.isolation import Available, IsolationUnavailable, assess, warning
from torl.sandbox.namespaces import hidden_prefixes
from torl.sandbox.outcome import CappedBuffer, classify
from torl.sandbox.scratch import make_root, remove_stale_roots, remove_tree


def test_capped_buffer_keeps_head_and_flags_overflow():
    buf = CappedBuffer(5)
    assert buf.append(b"abc") is False
    assert buf.append(b"defg") is True
    assert buf.text() == "abcde" and buf.truncated and buf.size == 5
    assert buf.append(b"more") is True and buf.text() == "abcde"


def test_capped_buffer_replaces_invalid_utf8():
    buf = CappedBuffer(100)
    buf.append(b"ok \xff\xfe end")
    assert buf.text() == "ok \ufffd\ufffd end"


@pytest.mark.parametrize(
    ("wait_status", "timed_out", "over", "setup_failed", "want"),
    [
        (0, False, False, False, ("ok", 0)),
        (1 << 8, False, False, False, ("error", 1)),
        (11, False, False, False, ("killed", -11)),
        (9, True, False, False, ("timeout", -9)),
        (None, True, False, False, ("timeout", None)),
        (9, False, True, False, ("killed", -9)),
        (125 << 8, False, False, True, ("sandbox_error", 125)),
        (None, False, False, True, ("sandbox_error", None)),  # the forker could not start it
        (125 << 8, False, False, False, ("error", 125)),  # exit 125 alone is the snippet's own (it can forge output)
    ],
)
def test_classify(wait_status, timed_out, over, setup_failed, want):
    assert classify(wait_status, timed_out, over, setup_failed) == want


def test_snippet_env_has_nothing_inherited():
    env = snippet_env("/tmp")
    assert env["HOME"] == "/tmp" and env["OMP_NUM_THREADS"] == "1"
    assert not any(k.startswith(("RAY", "WANDB", "VLLM")) for k in env)


def test_zygote_env_and_command_carry_no_secrets(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "secret-123")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    cfg = SandboxConfig()
    cmd = zygote_command(cfg, rank=2)
    assert "-I" in cmd and "secret-123" not in " ".join(cmd)  # isolated: no cwd or script dir on the import path
    assert not any(k.startswith(("RAY", "WANDB", "VLLM")) for k in ZYGOTE_ENV)
    limits = json.loads(cmd[-1])
    assert limits["uid_base"] == cfg.uid_base + 2000 and limits["preload"] == list(cfg.preload)


def test_limits_round_trip_and_reject_unknown_keys():
    limits = Limits.from_json(json.dumps(zygote_limits(SandboxConfig(timeout_s=3.0))))
    assert limits.timeout_s == 3.0 and limits.isolation == "strict"
    with pytest.raises(ValueError, match="unknown zygote limit"):
        Limits.from_json('{"timeout": 1}')


def test_sandbox_config_validation():
    with pytest.raises(ConfigError):
        SandboxConfig(num_workers=0)
    with pytest.raises(ConfigError):
        SandboxConfig(timeout_s=0)


def test_result_from_reply():
    res = result_from_reply({"status": "ok", "stdout": "1\n", "exit_code": 0, "wall_s": 0.01}, queue_s=0.5)
    assert res.ok and res.stdout == "1\n" and res.queue_s == 0.5 and not res.truncated
    bad = result_from_reply({"status": "weird"})
    assert bad.status == "sandbox_error" and "malformed" in bad.stderr


def test_exit_code_of_matches_python():
    assert exit_code_of(SystemExit()) == 0
    assert exit_code_of(SystemExit(3)) == 3
    assert exit_code_of(SystemExit(256 + 2)) == 2


def test_hidden_prefixes(tmp_path):
    locked = tmp_path / "home"
    (locked / "py").mkdir(parents=True)
    os.chmod(locked, 0o700)
    (top, path), *_ = hidden_prefixes([str(locked / "py")])  # pytest's own tmp root may be 0700 too
    assert path == str(locked / "py") and str(locked).startswith(top)
    os.chmod(locked, 0o755)
    assert all(top != str(locked) for top, _ in hidden_prefixes([str(locked / "py")]))
    assert hidden_prefixes(["/usr/lib"]) == []


def test_run_code_runs_as_script(capsys):
    # A non-daemon thread of the host that never ends on its own (the full suite leaves thread-pool workers
    # behind): run_code waits for the snippet's threads only, so this must not hang.
    release = threading.Event()
    host = threading.Thread(target=release.wait)
    host.start()
    ns = {"__name__": "__main__", "__builtins__": __builtins__}
    assert run_code("x = 2\nx + 1\nif __name__ == '__main__':\n    print(x)", ns) == 0
    assert capsys.readouterr().out == "2\n" and ns["x"] == 2
    assert run_code("raise SystemExit(4)", ns) == 4
    assert run_code("1/0", ns) == 1
    err = capsys.readouterr().err
    assert "ZeroDivisionError" in err and 'File "<snippet>", line 1' in err and "run_code" not in err
    # The snippet's own non-daemon thread is still waited for, as at interpreter exit.
    late = "import threading, time\nthreading.Thread(target=lambda: (time.sleep(0.2), print('late'))).start()"
    assert run_code(late, ns) == 0
    assert capsys.readouterr().out == "late\n"
    release.set()
    host.join()


FULL = Available(identity="uid", namespaces=True, seccomp=True, landlock=7)
DOCKER = Available(identity="uid", namespaces=False, seccomp=True, landlock=7)
BARE_USER = Available(identity=None, namespaces=False, seccomp=True, landlock=5)


def test_strict_runs_only_with_every_layer():
    report = assess("strict", FULL)
    assert report.level == "full" and report.missing == () and report.exposed == ()
    with pytest.raises(IsolationUnavailable) as exc:
        assess("strict", BARE_USER)
    msg = str(exc.value)
    assert "a user identity of the snippet's own" in msg and "network, mount, PID and IPC namespaces" in msg
    assert "user.max_user_namespaces" in msg and "seccomp=unconfined" in msg and "sandbox.isolation=best" in msg
    assert "Landlock" not in msg.split("Ways")[0]  # present layers are not listed as missing


def test_best_reports_what_is_missing_and_exposed():
    report = assess("best", DOCKER)
    assert report.level == "partial" and report.missing == ("namespaces",)
    assert len(report.exposed) == 1 and "UNIX sockets and SysV/POSIX IPC are closed by seccomp" in report.exposed[0]
    bare = assess("best", BARE_USER)
    assert bare.missing == ("identity", "namespaces")
    assert any("kill(-1)" in e for e in bare.exposed)  # Landlock ABI 5 cannot scope signals
    assert not any("kill(-1)" in e for e in assess("best", Available(None, False, True, 6)).exposed)
    assert bare.as_dict()["missing"] == ["identity", "namespaces"] and bare.as_dict()["landlock"] == 5


def test_none_uses_no_layer_and_says_so():
    report = assess("none", FULL)
    assert report.level == "none" and not report.used.seccomp and report.used.identity is None
    assert "isolation is off" in report.exposed[0]


def test_one_warning_for_partial_workers():
    full, partial = assess("best", FULL).as_dict(), assess("best", DOCKER).as_dict()
    assert warning([full, full]) is None and warning([assess("none", FULL).as_dict()]) is None
    text = warning([full, partial])
    assert text.startswith("SANDBOX ISOLATION IS PARTIAL") and "1 of 2 workers" in text
    assert "network, mount, PID and IPC namespaces" in text and "UNIX sockets and SysV/POSIX IPC" in text


def _deep_chain(top, depth: int) -> None:
    """``depth`` nested directories under ``top`` (deeper than Python's recursion limit and than PATH_MAX), the
    deepest without permissions, a file with a newline in its name every 500 levels."""
    fd = os.open(top, os.O_RDONLY)
    for i in range(depth):
        os.mkdir("d", dir_fd=fd)
        below = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = below
        if i % 500 == 0:
            os.close(os.open("odd\nname", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
    os.chmod(f"/proc/self/fd/{fd}", 0)
    os.close(fd)


def test_remove_tree_survives_depth_permissions_names_and_symlinks(tmp_path):
    """What a snippet can leave in scratch: a 3000-deep chain (shutil.rmtree raised RecursionError on it, and the
    zygote died with every snippet in flight), directories without permissions, odd names, a symlink out."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    tree = tmp_path / "scratch"
    tree.mkdir()
    _deep_chain(tree, 3000)
    (tree / "closed").mkdir()
    (tree / "closed" / "f").write_text("x")
    os.chmod(tree / "closed", 0)
    os.symlink(outside, tree / "link")
    assert remove_tree(str(tree)) and not tree.exists()
    assert (outside / "keep").read_text() == "x"  # the symlink was removed, not followed
    assert remove_tree(str(tmp_path / "missing"))


def test_scratch_root_is_new_private_and_stale_roots_go(tmp_path):
    """The zygote's root is a new directory of random name (never one planted under the expected name); stale roots
    of dead zygotes are removed, but not a lookalike another user owns, nor a live zygote's."""
    planted = tmp_path / f"torl-sandbox-{os.getpid()}"
    planted.mkdir()
    root, lock = make_root(str(tmp_path))
    assert root != str(planted) and os.path.basename(root).startswith(f"torl-sandbox-{os.getpid()}-")
    assert oct(os.stat(root).st_mode & 0o777) == "0o711" and os.stat(root).st_uid == os.geteuid()
    dead = tmp_path / "torl-sandbox-999999999-abc"
    dead.mkdir()
    _deep_chain(dead, 1500)
    foreign = tmp_path / "torl-sandbox-999999998-abc"
    foreign.mkdir()
    os.chown(foreign, 12345, 12345)
    # A live zygote in another PID namespace: its name's pid is no process here (or another one), but it holds its
    # root's lock. Its root was deleted under its snippets when liveness was read from the pid.
    elsewhere, elsewhere_lock = make_root(str(tmp_path))
    renamed = tmp_path / "torl-sandbox-999999997-abc"
    os.rename(elsewhere, renamed)
    remove_stale_roots(str(tmp_path))
    assert not dead.exists() and foreign.exists()
    assert os.path.isdir(root) and renamed.is_dir()
    os.close(elsewhere_lock)  # that zygote dies: its root is stale now
    remove_stale_roots(str(tmp_path))
    assert not renamed.exists() and os.path.isdir(root)
    os.close(lock)


def test_remove_tree_stops_when_a_step_up_is_not_the_way_down(tmp_path, monkeypatch):
    """Should a surviving process move a directory during the walk, ``..`` leads elsewhere: the walk stops there
    rather than deleting outside the tree (simulated: ``..`` opens a bystander directory)."""
    tree, bystander = tmp_path / "scratch", tmp_path / "bystander"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_text("x")
    bystander.mkdir()
    (bystander / "keep").write_text("x")

    class MovedOs:
        """``os`` as the walk sees it, but ``..`` opens the bystander."""

        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def open(path, flags, mode=0o777, *, dir_fd=None):
            return os.open(bystander, flags) if path == ".." else os.open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(scratch, "os", MovedOs())
    assert remove_tree(str(tree)) is False
    assert (bystander / "keep").read_text() == "x"
