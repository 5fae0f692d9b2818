"""The MMPT LightningModule, DataModule pieces and golden-set callbacks on a tiny token space and toy base."""

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mmsuite.callbacks.golden import GoldenDecoding, PromptAblation
from mmsuite.datamodules.mmpt import MMPTDataModule, _interleave, select_rows
from mmsuite.datamodules.shards import DatasetWriter
from mmsuite.lightning_modules.mmpt.module import MMPTModule, score_caption
from mmsuite.tokenizers.mmpt_sampling import MixtureSettings, TaskMixture
from mmsuite.tokenizers.mmpt_sequences import SequenceBuilder, collate
from mmsuite.tokenizers.mmpt_space import TASK_NAMES, FormatSettings, LayoutSettings, MMPTLayout
from mmsuite.tokenizers.token_space import TokenSpaceMismatch
from tests.unit.mmpt_fixtures import BASE_ROWS, BINS, FMT, IMAGE_CODES, TEXT, K, random_item, tiny_layout

TOY = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64)


def _ranges(layout: MMPTLayout) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "start"} for r in layout.token_space.to_dict()["ranges"]]


def _module(tmp_path, layout=None, tied=True, **over):
    layout = layout or tiny_layout()
    settings = dict(
        token_space=_ranges(layout),
        format=dataclasses.asdict(FMT),
        base_root=str(tmp_path),
        base={"toy": {**TOY, "tie_word_embeddings": tied, "max_position_embeddings": 128}, "init_noise": 0.1},
        adapters={"r": 4, "alpha": 8, "dropout": 0.0, "lr": 1e-2, "rows_lr": 1e-2},
        schedule={"warmup_steps": 0},
    )
    return MMPTModule(**{**settings, **over})


def _batch(layout, seed=0):
    rng = np.random.default_rng(seed)
    builder = SequenceBuilder(layout, FMT)
    return collate([builder.build(t, random_item(layout, rng, t)) for t in TASK_NAMES], layout.pad_id)


@pytest.mark.parametrize("tied", [True, False])
def test_module_builds_its_base_once_and_trains_only_lora_and_the_new_rows(tmp_path, capsys, tied):
    m = _module(tmp_path, tied=tied)
    assert "gate A2: trainable" in capsys.readouterr().out
    assert (m.base_dir / "token_space.json").is_file() and m.layout.sha256 == tiny_layout().sha256
    c = m.trainable_counts
    assert c["total"] == c["expected_total"] and c["other"] == 0
    stamp = (m.base_dir / "mmpt_base.json").stat().st_mtime_ns
    torch.manual_seed(0)
    built = _module(tmp_path / "fresh", tied=tied)
    torch.manual_seed(0)
    loaded = _module(tmp_path / "fresh", tied=tied)  # the same base, loaded, not rebuilt
    assert (m.base_dir / "mmpt_base.json").stat().st_mtime_ns == stamp
    lora = {n: p for n, p in built.named_parameters() if "lora_A" in n}  # building it drew nothing from the seed
    assert lora and all(torch.equal(p, dict(loaded.named_parameters())[n]) for n, p in lora.items())
    out = m(_batch(m.layout))
    out["loss"].backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None}
    assert grads and all(("lora_" in n) or ("trainable_tokens_delta" in n) for n in grads)
    assert set(m.row_norms()) == {"rows_embed_norm_mean", "rows_embed_norm_std"} | (
        set() if tied else {"rows_head_norm_mean", "rows_head_norm_std"}
    )


def test_gate_a1_refuses_a_base_of_another_token_space(tmp_path):
    m = _module(tmp_path)
    other = MMPTLayout.build(TEXT, BASE_ROWS, IMAGE_CODES + 4, K, BINS, LayoutSettings(multiple_of=64))
    with pytest.raises(TokenSpaceMismatch) as e:
        _module(tmp_path, layout=other, base_dir=str(m.base_dir))
    assert other.sha256 in str(e.value) and m.layout.sha256 in str(e.value)


def test_checkpoints_hold_only_the_trainable_tensors_and_load_back_exactly(tmp_path):
    m = _module(tmp_path)
    batch = _batch(m.layout)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m(batch)["loss"].backward()
    opt.step()
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    trainable = {f"model.{n}" for n, p in m.model.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == trainable and ckpt["mmpt"]["token_space_sha256"] == m.layout.sha256
    fresh = _module(tmp_path)
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"], strict=False)
    m.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.sequence_nll(batch), m.sequence_nll(batch), rtol=0, atol=0)
    broken = {"state_dict": dict(list(ckpt["state_dict"].items())[1:]), "mmpt": ckpt["mmpt"]}
    with pytest.raises(ValueError, match="trainable tensors differ"):
        fresh.on_load_checkpoint(broken)


def test_gate_a4_needs_the_tokenizers_that_decode_stored_targets(tmp_path):
    m = _module(tmp_path)
    rng = np.random.default_rng(0)
    dm = SimpleNamespace(golden_items=lambda: {t: [random_item(m.layout, rng, f"{t}0")] for t in TASK_NAMES})
    with pytest.raises(ValueError, match="image_tokenizer_ckpt"):
        m.decode_stored(dm)


def _fake_run(m, tmp_path, n=4, step=3):
    rng = np.random.default_rng(1)
    items = {t: [random_item(m.layout, rng, f"{t}{i}") for i in range(n)] for t in TASK_NAMES}
    dm = SimpleNamespace(
        golden_items=lambda: items,
        builder=SequenceBuilder(m.layout, FMT),
        text_tokenizer=None,
        golden_attributes={},
    )
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, datamodule=dm, global_step=step, loggers=[])
    return trainer


def test_golden_decoding_writes_every_output_and_decodes_all_writing_targets(tmp_path, monkeypatch):
    m = _module(tmp_path / "base")
    m.eval()
    monkeypatch.setattr(
        m,
        "render",
        lambda task, body: np.zeros((4, 4, 3), np.uint8) if task == "t2i" else (np.zeros(80, np.float32), 8000),
    )
    logged = {}
    monkeypatch.setattr(m, "log", lambda k, v, **_: logged.__setitem__(k, v))
    cb = GoldenDecoding(str(tmp_path / "qual"), media_per_task=2)
    shown = []
    board = SimpleNamespace(
        add_image=lambda tag, img, step, dataformats: shown.append((tag, img.shape, dataformats)),
        add_audio=lambda tag, wav, step, sample_rate: shown.append((tag, tuple(wav.shape), sample_rate)),
    )
    trainer = _fake_run(m, tmp_path)
    trainer.loggers = [SimpleNamespace(experiment=board)]
    cb.on_validation_epoch_end(trainer, m)
    assert sorted(t.split("/")[1] for t, *_ in shown) == ["t2a", "t2a", "t2i", "t2i"]
    assert ("golden/t2i/t2i0", (4, 4, 3), "HWC") in shown and shown[0][2] == 8000
    out = tmp_path / "qual" / "step_3"
    assert len(list(out.glob("t2i_*.png"))) == 4 and len(list(out.glob("t2a_*.wav"))) == 4
    rows = [json.loads(line) for line in (out / "a2t.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["ok"] for r in rows)
    summary = json.loads((tmp_path / "qual" / "golden_summary.json").read_text())
    for task in TASK_NAMES:
        s = summary["latest"][task]
        assert s["decode_rate"] == 1.0 and 0.0 <= s["decode_rate_unconstrained"] <= 1.0
        assert 0.0 <= s["illegal_mass"] <= 1.0
        assert logged[f"val/golden/{task}_decode_rate"] == 1.0
    # a later validation appends; a resumed run that validates step 3 again replaces it
    cb.on_validation_epoch_end(_fake_run(m, tmp_path, step=5), m)
    cb.on_validation_epoch_end(_fake_run(m, tmp_path, step=3), m)
    assert [e["step"] for e in json.loads((tmp_path / "qual" / "golden_summary.json").read_text())["history"]] == [3]


def test_caption_scores_sit_beside_the_share_of_the_sets_most_common_value(tmp_path, monkeypatch):
    m = _module(tmp_path / "base")
    m.eval()
    monkeypatch.setattr(m, "log", lambda *a, **k: None)
    trainer = _fake_run(m, tmp_path)
    colors = ["red", "red", "red", "blue"]
    trainer.datamodule.golden_attributes = {f"i2t{i}": {"color": c} for i, c in enumerate(colors)}
    said = iter([True, False, False, True])  # whether each generated caption names the right colour

    def media(task, row, out, text_tokenizer, attributes):
        return {"key": row["key"], **({"attributes": {"color": next(said)}} if attributes else {})}

    monkeypatch.setattr(m, "golden_media", media)
    GoldenDecoding(str(tmp_path / "qual"), unconstrained=False).on_validation_epoch_end(trainer, m)
    s = json.loads((tmp_path / "qual" / "golden_summary.json").read_text())["latest"]["i2t"]
    assert s["color_acc"] == 0.5 and s["color_majority"] == 0.75


def test_prompt_ablation_writes_gaps_with_intervals_and_their_growth(tmp_path, monkeypatch):
    m = _module(tmp_path / "base")
    m.eval()
    logged = {}
    monkeypatch.setattr(m, "log", lambda k, v, **_: logged.__setitem__(k, v))
    cb = PromptAblation(str(tmp_path), tasks=["t2a", "t2i"], n_boot=200)
    cb.on_validation_epoch_end(_fake_run(m, tmp_path, step=2), m)
    with torch.no_grad():  # the model moves between the two validations, so the gaps do too
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    cb.on_validation_epoch_end(_fake_run(m, tmp_path, step=6), m)
    res = json.loads((tmp_path / "prompt_ablation.json").read_text())
    assert [e["step"] for e in res["history"]] == [2, 6]
    for task in ("t2a", "t2i"):
        gap = res["latest"][task]["gap_shuffled"]
        assert gap["ci95"][0] <= gap["mean"] <= gap["ci95"][1]
        assert gap["ci95"] == [logged[f"val/ablation/{task}_gap_shuffled_ci_{e}"] for e in ("low", "high")]
        g = res["growth"][f"{task}_gap_empty"]
        assert set(g) == {"first", "last", "grew"} and g["first"] != g["last"]
        assert logged[f"val/ablation/{task}_gap_empty_first"] == g["first"]
        assert logged[f"val/ablation/{task}_gap_empty_growth"] == pytest.approx(g["last"] - g["first"])
    with pytest.raises(ValueError, match="unknown tasks"):
        PromptAblation(str(tmp_path), tasks=["t2x"])


def test_training_batches_keep_one_drawn_task_per_record():
    layout = tiny_layout()
    rng = np.random.default_rng(0)
    builder = SequenceBuilder(layout, FMT)
    items = [random_item(layout, rng, f"r{i}") for i in range(6)]
    seqs, record = [], []
    allowed = np.zeros((6, len(TASK_NAMES)), dtype=bool)
    for i, it in enumerate(items):
        for task in ("i2t", "t2i") if i % 2 else ("a2t", "t2a"):
            seqs.append(builder.build(task, it))
            record.append(i)
            allowed[i, TASK_NAMES.index(task)] = True
    batch = collate(seqs, layout.pad_id)
    mix = TaskMixture(MixtureSettings(ramp_start=100))
    out = select_rows(batch, mix, torch.from_numpy(allowed), torch.tensor(record), step=0, stream=0)
    assert out["task"].shape[0] == 6 and set(out["task"].tolist()) <= {0, 1}  # before the ramp: reading tasks
    assert out["input_ids"].shape[1] == int(out["attention_mask"].sum(1).max())
    late = select_rows(batch, mix, torch.from_numpy(allowed), torch.tensor(record), step=10**4, stream=0)
    assert late["task"].shape[0] == 6
    assert _interleave([1, 2, 3, 4], ["a", "b"]) == [1, "a", 2, 3, "b", 4]


def test_caption_scores_read_image_and_sound_attributes():
    img = {"modality": "image", "source": "toyworld", "color": "red", "action": "jump"}
    assert score_caption("a red figure jumping on a plain blue background", img) == {"color": True, "action": True}
    assert score_caption("a blue figure", img) == {"color": False, "action": False}
    assert score_caption("a red figure", {**img, "source": "llava"}) == {}
    snd = {
        "modality": "audio",
        "source": "toysound",
        "kind": "beep",
        "pitch": "high",
        "count": 2,
        "loudness": "loud",
        "length": "short",
    }
    got = score_caption("two loud short high beeps", snd)
    assert got == dict.fromkeys(got, True) and len(got) == 5


class _ShardDM(MMPTDataModule):
    dataset_name = "mmpt-test"


def _write_records(root, layout, records):
    with DatasetWriter(root, 8, info={"golden": {}}, token_space=layout.token_space) as w:
        for key, item, modality in records:
            body = item.image if modality == "image" else item.audio
            members = {
                "text.npy": np.asarray(item.text, np.int64),
                "media.npy": np.asarray(body, np.int64),
                "caption.txt": "x",
                "attributes.json": {"modality": modality, "source": "test"},
            }
            w.write("val", key, members)


def test_gate_a3_checks_stored_records_and_stops_on_a_broken_one(tmp_path):
    layout = tiny_layout()
    rng = np.random.default_rng(0)
    dm = _ShardDM(
        token_space=layout.token_space,
        data_dir=str(tmp_path),
        batch_size=2,
        image_tokenizer={"run": "i", "ckpt": "i.ckpt"},
        audio_tokenizer={"run": "a", "ckpt": "a.ckpt"},
        text_tokenizer={},
        log_dir=str(tmp_path),
        format=dataclasses.asdict(FMT),
        check_records=8,
    )
    good = [(f"r{i}", random_item(layout, rng, f"r{i}"), "image" if i % 2 else "audio") for i in range(4)]
    _write_records(tmp_path / "mmpt-test", layout, good)
    assert dm.check_records("val") == {"records": 4, "sequences": 8}
    # Stage 3 rows: each record's reading sequence (labels on the caption) and its caption alone
    rows = dm.stage3_rows("val")
    t_open, t_close, _ = layout.tags("text")
    for (ids, labels), (text_ids, text_labels), (_, item, _) in zip(rows[::2], rows[1::2], good):
        assert list(ids[labels != -100])[-len(item.text) - 1 :] == [*item.text, t_close]
        assert list(text_ids) == [t_open, *item.text, t_close] and text_labels[0] == -100
        assert (text_labels[1:] == text_ids[1:]).all()
    bad = random_item(layout, rng, "bad")
    bad.image = bad.image[:-1]  # one image token short
    (tmp_path / "mmpt-test").rename(tmp_path / "old")
    _write_records(tmp_path / "mmpt-test", layout, [*good, ("bad", bad, "image")])
    with pytest.raises(ValueError, match="gate A3: i2t record dropped \\(bad_image\\)"):
        dm.check_records("val")
    samples = [
        {"__key__": k, "text": np.asarray(it.text), "media": np.asarray(it.image if m == "image" else it.audio),
         "attributes": {"modality": m, "source": "t"}}
        for k, it, m in good
    ]  # fmt: skip
    batch = dm.collate([dm.expand(s)[0] for s in samples])
    assert batch["input_ids"].shape[0] == 8 and batch["allowed"].sum() == 8 and batch["drops"].sum() == 0


def test_building_the_data_leaves_the_runs_random_streams_alone(tmp_path, monkeypatch):
    dm = _ShardDM(
        token_space=tiny_layout().token_space,
        data_dir=str(tmp_path),
        image_tokenizer={"run": "i", "ckpt": "i.ckpt"},
        audio_tokenizer={"run": "a", "ckpt": "a.ckpt"},
        text_tokenizer={},
        log_dir=str(tmp_path),
        format=dataclasses.asdict(FMT),
    )
    monkeypatch.setattr(dm, "_prepare_data", lambda: (torch.rand(3), np.random.rand(3)))  # a build that draws

    def draws(build: bool):
        torch.manual_seed(0), np.random.seed(0)
        if build:
            dm.prepare_data()
        return torch.rand(2).tolist(), np.random.rand(2).tolist()

    assert draws(build=True) == draws(build=False)


def test_format_settings_reach_both_sides():
    assert FormatSettings(**dataclasses.asdict(FMT)) == FMT


def test_gate_c3_text_nll_equals_the_bases_until_training_moves_the_adapters(tmp_path):
    m = _module(tmp_path)
    m.eval()
    rng = np.random.default_rng(0)
    captions = [rng.integers(m.layout.text.start, m.layout.text.stop, size=5).tolist() for _ in range(3)]
    before = m.text_nll(captions)
    assert before["text_nll_delta"].item() == 0.0 and before["text_nll"].item() > 0  # LoRA B = 0, rows as the base
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0)
    m.train()
    m(_batch(m.layout))["loss"].backward()
    opt.step()
    m.eval()
    after = m.text_nll(captions)
    assert after["text_nll_base"].item() == pytest.approx(before["text_nll_base"].item(), abs=1e-6)
    assert after["text_nll_delta"].item() != 0.0


def test_real_caption_folders_become_records_split_by_item(tmp_path):
    import csv

    from PIL import Image

    from mmsuite.datamodules.mmpt import CaptionFolderSettings, real_records
    from mmsuite.sources.wav import write_wav

    (tmp_path / "img").mkdir()
    (tmp_path / "aud").mkdir()
    entries = []
    for i in range(6):
        Image.fromarray(np.full((24, 40, 3), 20 * i, np.uint8)).save(tmp_path / "img" / f"{i}.png")
        entries.append({"id": f"im{i}", "image": f"{i}.png", "caption": f"picture {i}"})
    (tmp_path / "chat.json").write_text(json.dumps(entries))
    with open(tmp_path / "caps.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption_1", "caption_2"])
        for i in range(3):
            write_wav(tmp_path / "aud" / f"s{i}.wav", np.zeros(16000, np.float32), 16000)
            w.writerow([f"s{i}.wav", f"sound {i}", f"noise {i}"])
    real = CaptionFolderSettings(
        str(tmp_path / "chat.json"), str(tmp_path / "img"), str(tmp_path / "caps.csv"), str(tmp_path / "aud")
    )
    image = SimpleNamespace(image_size=(16, 16), encode=lambda px: torch.full((px.shape[0], 2, 2), 7))
    audio = SimpleNamespace(
        sample_rate=8000, encode=lambda wav, sample_rate: torch.zeros(1, 4 * wav.shape[-1] // 4000, dtype=torch.long)
    )
    text = SimpleNamespace(encode=lambda s: [len(s)])
    recs = list(real_records(real, {"train": 0.5, "val": 0.5}, 0, image, audio, text, max_seconds=0.5))
    assert len(recs) == 6 + 6 and {r[2]["attributes.json"]["source"] for r in recs} == {"llava", "audiocaps"}
    by_item = {}
    for split, _key, members in recs:
        by_item.setdefault(members["attributes.json"]["item"], set()).add(split)
    assert all(len(s) == 1 for s in by_item.values())  # both captions of a sound stay in its split
    sound = next(m for _, k, m in recs if k.startswith("audiocaps"))
    assert sound["media.npy"].shape == (4,)  # 0.5 s at 8 kHz: the source was cut, never the target
    assert next(m for _, k, m in recs if k.startswith("llava"))["media.npy"].tolist() == [7] * 4


def test_eval_runs_the_experiments_extra_callbacks_into_its_own_folder(tmp_path):
    from omegaconf import OmegaConf

    from mmsuite.run import eval_callbacks

    run = tmp_path / "run"
    saved = OmegaConf.create(
        {
            "callbacks": {
                "extra": {
                    "golden": {"_target_": "mmsuite.callbacks.golden.GoldenDecoding", "out_dir": str(run / "qual")},
                    "ablation": {
                        "_target_": "mmsuite.callbacks.golden.PromptAblation",
                        "out_dir": str(run),
                        "tasks": ["t2i"],
                    },
                }
            }
        }
    )
    golden, ablation = eval_callbacks(saved, run, "test")
    assert isinstance(golden, GoldenDecoding) and golden.out_dir == run / "eval_test" / "qual"
    assert isinstance(ablation, PromptAblation) and ablation.out_dir == run / "eval_test"
    assert eval_callbacks(OmegaConf.create({"callbacks": {}}), run, "val") == []


def test_a_local_hf_base_is_extended_with_its_own_specials_banned_from_text(tmp_path):
    from tokenizers import AddedToken, Tokenizer, models

    from mmsuite.lightning_modules.mmpt.base import ToyLMSettings, build_toy_lm

    src = tmp_path / "qwen"
    vocab = {f"w{i}": i for i in range(TEXT - 2)} | {"[UNK]": TEXT - 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.add_special_tokens([AddedToken("<|im_end|>", special=True)])
    build_toy_lm(TEXT, ToyLMSettings(**TOY, rows=BASE_ROWS, max_position_embeddings=128)).save_pretrained(str(src))
    tok.save(str(src / "tokenizer.json"))
    m = _module(tmp_path, base={"path": str(src)})
    assert m.layout.banned_text_ids == (TEXT - 1,) and (m.base_dir / "tokenizer.json").is_file()
    assert m.grammar.allowed[m.grammar.state["text"], TEXT - 1].item() is False


def _fake_trainer(data, barriers, rank_zero=True):
    strategy = SimpleNamespace(root_device=torch.device("cpu"), barrier=barriers.append)
    return SimpleNamespace(datamodule=data, is_global_zero=rank_zero, strategy=strategy)


class _ReadingData:
    """What the module asks of the datamodule to pretrain a base: Stage 3 rows and the data set's name."""

    def __init__(self, layout, name="mmpt-aaaa"):
        rng = np.random.default_rng(0)
        builder = SequenceBuilder(layout, FMT)

        # a learnable reading task: the caption repeats the first image tokens' offsets as text ids
        def seq(i):
            it = random_item(layout, rng, f"r{i}", text_len=3)
            it.text = [layout.text.start + (t - layout.image.start) % TEXT for t in it.image[:3]]
            s = builder.build("i2t", it)
            return s.input_ids, s.labels

        self.seqs = {"train": [seq(i) for i in range(64)], "val": [seq(100 + i) for i in range(16)]}
        self.root = SimpleNamespace(name=name)
        self.calls = []

    def stage3_rows(self, split):
        self.calls.append(split)
        return self.seqs[split]


def test_a_pretrained_base_waits_for_the_data_then_trains_every_weight_on_the_reading_tasks(tmp_path, capsys):
    pretrain = {"steps": 30, "batch_size": 16, "lr": 1e-2, "warmup_steps": 0, "val_rows": 16}
    base = {"toy": {**TOY, "max_position_embeddings": 128}, "init_noise": 0.1, "pretrain": pretrain}
    m = _module(tmp_path, base=base)
    assert m.model is None and not m.base_dir.exists()  # no data yet: Lightning's hook builds it later
    with pytest.raises(FileNotFoundError, match="python train.py"):  # a checkpoint cannot be loaded into nothing
        m.on_load_checkpoint({"state_dict": {}})
    data = _ReadingData(m.layout)
    barriers = []
    m._trainer = _fake_trainer(data, barriers)
    with torch.device("meta"):  # Lightning's hook runs under the accelerator as default device: building ignores it
        m.configure_model()
    assert barriers == ["mmpt-stage3-base"] and next(m.model.parameters()).device.type == "cpu"
    assert (
        data.calls == ["train", "val"]
        and "Stage 3: 30 steps on 64 A2T/I2T and text-only rows" in capsys.readouterr().out
    )
    record = json.loads((m.base_dir / "mmpt_base.json").read_text())["pretrain"]
    assert record["data"] == "mmpt-aaaa" and record["steps"] == 30
    assert record["val_loss_after"] < record["val_loss_before"] - 0.5
    # every weight moved (not only the rows or LoRA): compare with the same base built without pretraining
    plain = _module(tmp_path / "plain", base={**base, "pretrain": {"steps": 0}})
    trained = dict(m.model.get_base_model().named_parameters())
    for n, p in plain.model.get_base_model().named_parameters():
        if "lora_" not in n and "trainable_tokens" not in n:
            assert not torch.equal(p, trained[n]), n
    # a later run finds the base (built at __init__, no data needed) and refuses other task shards
    again = _module(tmp_path, base=base)
    assert again.model is not None
    again.check_base_data(SimpleNamespace(root=SimpleNamespace(name="mmpt-aaaa")))
    with pytest.raises(ValueError, match="pretrained on the task shards mmpt-aaaa, this run reads mmpt-bbbb"):
        again.check_base_data(SimpleNamespace(root=SimpleNamespace(name="mmpt-bbbb")))
    # another rank does not build it: it waits at the barrier and loads what rank 0 built
    other = _module(tmp_path / "rank1", base=base)
    barriers.clear()
    other._trainer = _fake_trainer(_ReadingData(other.layout), barriers, rank_zero=False)
    with pytest.raises(FileNotFoundError, match="not a Stage 3 base"):  # rank 0 never ran in this test
        other.configure_model()
    assert barriers == ["mmpt-stage3-base"] and not other.base_dir.exists()
    # a run without the MMPT datamodule is told so, not left without a model
    other._trainer = _fake_trainer(None, barriers)
    with pytest.raises(ValueError, match="needs the MMPT datamodule"):
        other.configure_model()
