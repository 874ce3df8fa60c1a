"""A model argument is checked locally, in one place (utils.model_zoo.resolve_model), before transformers sees it:
a missing path is one error line at every entry point, and no request is made, with the network allowed
(no HF_HUB_OFFLINE) but every proxy pointed at a local listener that counts connections. One evaluation
reads config.json once (utils.evaluate.EvalPlan)."""
import socket
import sys
import threading

import pytest
from transformers.configuration_utils import PreTrainedConfig

from conftest import REPO_PATH, run_cli
from utils.errors import InputError
from utils.evaluate import evaluate, plan_evaluation
from utils.model_zoo import MODELS, resolve_model

TINY_MODEL = str(REPO_PATH / "assets" / "tiny_llama")
HELD_OUT = str(REPO_PATH / "assets" / "data" / "shakespeare_eval.jsonl")


@pytest.fixture
def network():
    """(env with the network allowed but every proxy at a local listener, the connections it saw)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    seen, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            conn.settimeout(1)
            try:
                seen.append(conn.recv(200).decode(errors="replace"))
            except OSError:
                seen.append("")
            conn.close()  # the request fails at once

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    proxy = f"http://127.0.0.1:{server.getsockname()[1]}"
    env = {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "NO_PROXY": "",
           "no_proxy": "", **{k: proxy for k in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy",
                                                 "http_proxy", "all_proxy")}}
    yield env, seen
    stop.set()
    thread.join()
    server.close()


ENTRY_POINTS = {
    "eval": lambda m, t: [sys.executable, "eval.py", m],
    "train": lambda m, t: [sys.executable, "train.py", "--input_model_filename", m, "--local_dir", str(t / "out")],
    "generate": lambda m, t: [sys.executable, "generate_data.py", "0", "--model", m, "--out_dir", str(t / "out")],
    "export": lambda m, t: [sys.executable, "export.py", m, str(t / "out")],
    "run_generate": lambda m, t: ["sh", "run_generate.sh", "1", "--model", m, "--out_dir", str(t / "out")],
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_missing_model_is_one_line_and_no_request(tmp_path, network, entry):
    env, seen = network
    missing = "no_such_dir"  # relative, as a user types it: a valid hub repo id, unlike an absolute path
    assert not (REPO_PATH / missing).exists()
    proc = run_cli(ENTRY_POINTS[entry](missing, tmp_path), env={**env, "LOG_DIR": str(tmp_path / "logs")},
                   check=False)
    assert seen == [], seen
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and repr(missing) in lines[0] and "no such directory" in lines[0]
    assert "smollm2" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "logs").exists()


def test_a_local_model_makes_no_request(tmp_path, network):
    env, seen = network
    proc = run_cli([sys.executable, "eval.py", TINY_MODEL, "--ppl_data", HELD_OUT, "--seq_len", "64",
                    "--max_windows", "1"], env=env)
    assert "perplexity shakespeare_eval" in proc.stdout and seen == []


def test_resolve_model_names_the_problem(tmp_path):
    names = ", ".join(MODELS)
    with pytest.raises(InputError, match=f"model '{tmp_path}/nope': no such directory .*packaged name: {names}"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="'.*file': not a directory"):
        resolve_model(str(tmp_path / "file"))
    with pytest.raises(InputError, match=f"--input_model_filename '{tmp_path}': a directory without config.json"):
        resolve_model(str(tmp_path), "--input_model_filename")
    assert resolve_model(TINY_MODEL) == TINY_MODEL


@pytest.fixture
def config_reads(monkeypatch):
    """The config.json files transformers parses, as a list of paths."""
    reads, original = [], PreTrainedConfig.__dict__["_dict_from_json_file"].__func__

    def counting(cls, json_file):
        reads.append(str(json_file))
        return original(cls, json_file)

    monkeypatch.setattr(PreTrainedConfig, "_dict_from_json_file", classmethod(counting))
    return reads


@pytest.mark.parametrize("bits", [None, (4, 8, 4)])
def test_one_evaluation_reads_config_json_once(config_reads, bits):
    from models.quant_model import QuantSetting
    setting = QuantSetting(*bits) if bits else None
    result = evaluate(TINY_MODEL, setting, ppl_data=[HELD_OUT], max_windows=2, seq_len=64)
    assert result["method"] == ("RTN" if bits else "FP") and result["ppl"]["shakespeare_eval"]["windows"] == 2
    assert [r for r in config_reads if r.endswith("config.json")] == [f"{TINY_MODEL}/config.json"]


def test_the_plan_is_checked_and_complete_before_any_weights_load(monkeypatch):
    import utils.evaluate
    monkeypatch.setattr(utils.evaluate, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    plan = plan_evaluation(TINY_MODEL, ppl_data=[HELD_OUT], seq_len=4096, dtype="float32")
    assert (plan.model, plan.method, plan.setting.label, plan.seq_len) == (TINY_MODEL, "FP", "32-32-32", 512)
    assert (plan.ppl_files, plan.tasks, plan.dtype, plan.calibration) == ((HELD_OUT,), (), "float32", None)
    gptq = plan_evaluation(TINY_MODEL, utils.evaluate.QuantSetting(4, 8, 4), "GPTQ", ppl_data=[],
                           calib_data=[HELD_OUT], calib_windows=3, calib_seq_len=1024)
    assert (gptq.method, gptq.calibration) == ("GPTQ", utils.evaluate.Calibration((HELD_OUT,), 3, 512))
    with pytest.raises(InputError, match="no such file"):
        plan_evaluation(TINY_MODEL, ppl_data=["/nonexistent.jsonl"])
