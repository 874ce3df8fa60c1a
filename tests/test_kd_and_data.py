"""KD loss against a hand computation; data loading, blocks and its errors."""
import json
import math

import pytest
import torch

from utils.data import DataError, expand_paths, load_blocks, read_texts
from utils.kd_trainer import kd_loss


def test_kd_loss_hand_value():
    # teacher p = [3/4, 1/4], student p = [1/2, 1/2] at each of 2 x 3 tokens
    teacher = torch.tensor([math.log(3.0), 0.0]).expand(2, 3, 2)
    student = torch.zeros(2, 3, 2)
    per_token = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_loss(student, teacher).item() == pytest.approx(per_token * 6 / 2, rel=1e-6)  # sum / batch


def test_kd_loss_zero_for_equal_logits_and_gradient_flows_to_student():
    t = torch.randn(2, 4, 10)
    s = t.clone().requires_grad_()
    loss = kd_loss(s, t)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    kd_loss(s + torch.randn_like(s), t).backward()
    assert s.grad.abs().sum() > 0


class CharTokenizer:
    """Stand-in tokenizer: one id per character, BOS = 1."""
    bos_token_id = 1

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[2 + (ord(c) % 50) for c in t] for t in texts]}


def write_jsonl(path, texts, raw_tail=""):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts) + raw_tail)
    return str(path)


def test_blocks_have_bos_per_text_and_drop_the_remainder(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", ["abc", "defgh"])  # 4 + 6 = 10 tokens -> 3 blocks of 3, 1 dropped
    data = load_blocks(f, CharTokenizer(), 3)
    assert len(data) == 3
    ids = torch.cat([data[i]["input_ids"] for i in range(3)]).tolist()
    assert ids[0] == 1 and ids[4] == 1 and len(ids) == 9
    assert torch.equal(data[0]["labels"], data[0]["input_ids"])


def test_many_files_glob_and_comma_list_in_sorted_order(tmp_path):
    write_jsonl(tmp_path / "gen.chunk.01.jsonl", ["b"])
    write_jsonl(tmp_path / "gen.chunk.00.jsonl", ["a"])
    write_jsonl(tmp_path / "other.jsonl", ["c"])
    glob_paths = expand_paths(str(tmp_path / "gen.chunk.*.jsonl"))
    assert [p.split("/")[-1] for p in glob_paths] == ["gen.chunk.00.jsonl", "gen.chunk.01.jsonl"]
    assert len(expand_paths(f"{tmp_path}/gen.chunk.*.jsonl,{tmp_path}/other.jsonl")) == 3
    assert len(expand_paths(str(tmp_path))) == 3


def test_corrupt_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": broken}\n{"text": "ok"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not a JSON object"):
        read_texts(str(f))


def test_missing_text_field_is_an_error(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"content": "x"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1"):
        read_texts(str(f))


def test_unfinished_last_line_of_a_live_shard_is_skipped(tmp_path):
    f = write_jsonl(tmp_path / "live.jsonl", ["one", "two"], raw_tail='{"text": "thr')
    assert read_texts(f) == ["one", "two"]


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl: no text lines"):
        read_texts(str(tmp_path / "empty.jsonl"))


def test_too_short_data_is_an_error(tmp_path):
    f = write_jsonl(tmp_path / "short.jsonl", ["abc"])
    with pytest.raises(DataError, match=r"short.jsonl: 4 tokens, fewer than one block of 2048"):
        load_blocks(f, CharTokenizer(), 2048)


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        expand_paths(str(tmp_path / "nothing*.jsonl"))


@pytest.mark.parametrize("config, efficient", [
    (None, True),  # FSDP2 by default: ranks != 0 get rank 0's weights (one copy in host RAM)
    ('{"fsdp_cpu_ram_efficient_loading": false}', False),  # accelerate's key spelling, turned off
    ('{"version": 1}', False),  # FSDP1: every rank loads, as the original
    ("FILE", True),  # a JSON file, as transformers reads it; the layer class is kept
])
def test_fsdp_loads_weights_on_rank_0_only_unless_told_otherwise(tmp_path, config, efficient):
    from utils.process_args import process_args
    if config == "FILE":
        config = str(tmp_path / "fsdp.json")
        json.dump({"fsdp_transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}, open(config, "w"))
    argv = ["--fsdp", "full_shard auto_wrap", "--use_cpu", "True", "--local_dir", str(tmp_path)]
    _, _, args = process_args(argv + (["--fsdp_config", config] if config else []))
    assert args.fsdp_plugin_args["cpu_ram_efficient_loading"] is efficient
    if config and config.endswith(".json"):
        assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    _, _, plain = process_args(["--use_cpu", "True", "--local_dir", str(tmp_path)])
    assert plain.fsdp_plugin_args is None  # no FSDP, nothing added
