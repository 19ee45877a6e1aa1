"""The rescaled start of post-LN norms (hf_adanorm/convert/rescale.py): it finds BERT's readers and
residual writers, it is exact where every gain is a constant, and a conversion starts closer."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

import hf_adanorm
from hf_adanorm.convert import ConvertArgs, convert_model
from hf_adanorm.convert.rescale import apply_sites, find_sites, restore

pytestmark = pytest.mark.usefixtures("one_thread")


def _bert(constant_gains: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=32)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                gain = torch.rand(module.weight.shape) + 0.5
                module.weight.copy_(gain.mean().expand_as(gain) if constant_gains else gain)
                module.bias.copy_(torch.randn(module.bias.shape) * 0.3)
    return model


def _batch(seed=1, n=3, t=9):
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 50, (n, t), generator=gen), "attention_mask": torch.ones(n, t, dtype=torch.long)}


def _save_bert_and_text(folder, texts):
    """``folder/bert`` (the tiny BERT, a word tokenizer of ``texts``) and ``folder/texts.txt``."""
    from hf_adanorm.training.modeling import build_vocab_tokenizer
    (folder / "texts.txt").write_text("\n".join(texts))
    tokenizer = build_vocab_tokenizer(texts, "word")
    teacher = _bert(False)
    teacher.resize_token_embeddings(len(tokenizer))
    teacher.save_pretrained(folder / "bert")
    tokenizer.save_pretrained(folder / "bert")


NORMS = ["embeddings.LayerNorm"] + [f"encoder.layer.{i}.{part}.LayerNorm" for i in range(2)
                                    for part in ("attention.output", "output")]


def test_finds_the_readers_and_the_residual_writer_of_every_post_ln_norm_but_the_last():
    sites = find_sites(_bert(False), NORMS, _batch())
    assert list(sites) == NORMS[:-1]  # the last norm's output is the model's: nothing to rescale
    first = sites["embeddings.LayerNorm"]
    assert sorted(first.readers) == [f"encoder.layer.0.attention.self.{p}" for p in ("key", "query", "value")]
    assert first.writer == "encoder.layer.0.attention.output.dense"
    assert first.next_norm == "encoder.layer.0.attention.output.LayerNorm"
    middle = sites["encoder.layer.0.attention.output.LayerNorm"]
    assert middle.readers == ["encoder.layer.0.intermediate.dense"]
    assert middle.writer == "encoder.layer.0.output.dense"


def test_pre_ln_norms_have_no_site():
    torch.manual_seed(0)
    gpt2 = GPT2Model(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()
    names = [n for n, m in gpt2.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    assert find_sites(gpt2, names, {"input_ids": _batch()["input_ids"]}) == {}


@pytest.mark.parametrize("norm, options", [("layernorm_simple", {}), ("adanorm", {"C": 2.0, "k": 1e-7})])
def test_exact_where_every_gain_is_a_constant(norm, options):
    # With γ = g·1 in every norm the rescaled student computes the teacher's function: its output is
    # the teacher's last norm before that norm's gain and bias, y_last = (T − β_last) / g_last.
    # (AdaNorm with k → 0 is C·y, so its scale C must be undone exactly too.)
    teacher = _bert(True)
    student = copy.deepcopy(teacher)
    sites = find_sites(teacher, NORMS, _batch())
    apply_sites(student, teacher.get_submodule, sites, scale=options.get("C", 1.0))
    hf_adanorm.patch_model(student, norm, eps_mode="torch", **options)
    batch = _batch(seed=2)
    with torch.no_grad():
        reference = teacher(**batch).last_hidden_state
        got = student(**batch).last_hidden_state / options.get("C", 1.0)
    last = teacher.get_submodule(NORMS[-1])
    expected = (reference - last.bias) / last.weight
    # the student's norms see inputs scaled by c/g, so only eps (1e-12) separates them
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # and without the rescaled start the naive swap is far off
    naive = copy.deepcopy(teacher)
    hf_adanorm.patch_model(naive, norm, eps_mode="torch", **options)
    with torch.no_grad():
        assert (naive(**batch).last_hidden_state / options.get("C", 1.0) - expected).abs().max() > 0.1


def test_restore_puts_back_every_tensor():
    teacher = _bert(False)
    student = copy.deepcopy(teacher)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    saved = apply_sites(student, teacher.get_submodule, find_sites(teacher, NORMS, _batch()), scale=1.0)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    restore(student, saved)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_a_conversion_starts_from_the_rescaled_student_and_reports_it(tmp_path):
    words = "the a film movie good bad dull bright long short story actor plot scene".split()
    gen = torch.Generator().manual_seed(0)
    _save_bert_and_text(tmp_path, [" ".join(words[int(i)] for i in torch.randint(0, len(words), (8,), generator=gen))
                                   for _ in range(200)])
    common = dict(model=str(tmp_path / "bert"), dataset=str(tmp_path / "texts.txt"), norm="layernorm_simple",
                  max_steps=4, eval_every=2, max_length=16, per_device_batch_size=8, checkpointing_steps=None)
    result = convert_model(ConvertArgs(output_dir=str(tmp_path / "rescaled"), **common))
    plain = convert_model(ConvertArgs(output_dir=str(tmp_path / "plain"), rescale_post_ln=False, **common))
    assert sorted(result["rescaled"]) == sorted(NORMS[:-1]) and plain["rescaled"] == {}
    assert result["start"]["embedding_cosine"] > result["naive"]["embedding_cosine"]
    assert result["naive"] == pytest.approx(plain["naive"])  # the naive swap is measured before the rescale
    assert result["start_alpha"] == pytest.approx(4 / 5)
    report = (tmp_path / "rescaled" / "conversion.md").read_text()
    assert "rescaled start" in report and "rescaled start" not in (tmp_path / "plain" / "conversion.md").read_text()


@pytest.mark.parametrize("constant_gains", [True, False])
def test_norm_targets_vanish_exactly_when_the_rescaled_student_is_the_teacher(constant_gains):
    from hf_adanorm.convert.rescale import NormTargets
    teacher = _bert(constant_gains)
    student = copy.deepcopy(teacher)
    sites = find_sites(teacher, NORMS, _batch())
    apply_sites(student, teacher.get_submodule, sites, scale=1.0)
    hf_adanorm.patch_model(student, "layernorm_simple", eps_mode="torch")
    targets = NormTargets(teacher, student, list(sites), scale=1.0)
    batch = _batch(seed=3)
    with torch.no_grad():
        teacher(**batch)
        student(**batch)
    loss = float(targets.loss(batch["attention_mask"]))
    assert loss < 1e-6 if constant_gains else loss > 1e-3
    targets.remove()
    assert not teacher.get_submodule(NORMS[0])._forward_hooks


@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf"), True, "10"])
def test_a_bad_layer_loss_weight_is_refused(value, tmp_path):
    with pytest.raises(ValueError, match="layer_loss_weight"):
        ConvertArgs(model="m", dataset="d", output_dir=str(tmp_path / "out"), layer_loss_weight=value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, value", [
    ("learning_rate", True), ("learning_rate", "5e-4"), ("max_grad_norm", True), ("max_grad_norm", "1"),
    ("ramp_fraction", "0.5"), ("ramp_fraction", float("nan")), ("validation_fraction", True),
    ("validation_fraction", "0.1"), ("warmup_steps", True), ("seed", False),
])
def test_a_bool_or_a_string_is_not_taken_as_a_number(option, value, tmp_path):
    # a bool is an int to Python (True would pass as 1), and a string from a JSON --convert-options
    # would fail deep inside the optimizer; both get the option's own message, nothing written
    with pytest.raises(ValueError, match=option):
        ConvertArgs(model="m", dataset="d", output_dir=str(tmp_path / "out"), **{option: value})
    assert not (tmp_path / "out").exists()


class _HiddenRead(torch.nn.Module):
    """A post-LN block whose first norm's output is also read outside any nn.Linear (F.linear)."""

    def __init__(self, hidden_read: bool):
        super().__init__()
        torch.manual_seed(0)
        self.hidden_read = hidden_read
        self.ln0, self.ln1 = torch.nn.LayerNorm(8), torch.nn.LayerNorm(8)
        self.reader, self.writer = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.other = torch.nn.Parameter(torch.randn(8, 8) / 3)
        with torch.no_grad():
            self.ln0.weight.uniform_(0.5, 1.5)
            self.ln0.bias.normal_(0, 0.3)

    def forward(self, x):
        z = self.ln0(x)
        h = torch.relu(self.reader(z))
        if self.hidden_read:
            h = h + torch.nn.functional.linear(z, self.other)
        return self.ln1(z + self.writer(h))


@pytest.mark.parametrize("hidden_read", [False, True])
def test_a_site_with_a_reader_the_hooks_cannot_see_is_rejected(hidden_read):
    from hf_adanorm.convert.rescale import verified_sites
    model = _HiddenRead(hidden_read).eval()
    batch = {"x": torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))}
    assert list(find_sites(model, ["ln0", "ln1"], batch)) == ["ln0"]  # the hooks see reader and writer either way
    assert list(verified_sites(model, ["ln0", "ln1"], batch)) == ([] if hidden_read else ["ln0"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_teacher_gets_the_same_sites(dtype):
    from hf_adanorm.convert.rescale import verified_sites
    teacher = _bert(False)
    want = verified_sites(teacher, NORMS, _batch())
    got = verified_sites(teacher.to(dtype), NORMS, _batch())
    assert list(want) == NORMS[:-1] and list(got) == list(want)
    assert [s.writer for s in got.values()] == [s.writer for s in want.values()]


def test_no_norm_is_not_rescaled(tmp_path):
    # NoNorm outputs x itself, not about c·y: the rescaled start's premise does not hold
    _save_bert_and_text(tmp_path, [" ".join(["good", "bad", "film", "plot"][(i * j) % 4] for j in range(6))
                                   for i in range(40)])
    result = convert_model(ConvertArgs(model=str(tmp_path / "bert"), dataset=str(tmp_path / "texts.txt"),
                                       norm="no_norm", max_steps=1, eval_every=1, max_length=8,
                                       per_device_batch_size=4, checkpointing_steps=None,
                                       output_dir=str(tmp_path / "out")))
    assert result["rescaled"] == {} and result["start"] is None


def test_the_gain_weights_leave_padding_out():
    # g weighs γ by E[y²] over the probe's tokens: a padded copy of a sequence must give the gain of
    # the sequence alone (BERT's real tokens do not see the padding).
    model = _bert(False)
    alone = _batch(n=1, t=5)
    padded = {"input_ids": torch.cat([alone["input_ids"], torch.zeros(1, 7, dtype=torch.long)], 1),
              "attention_mask": torch.cat([alone["attention_mask"], torch.zeros(1, 7, dtype=torch.long)], 1)}
    want, got = find_sites(model, NORMS, alone), find_sites(model, NORMS, padded)
    assert list(got) == list(want) == NORMS[:-1]
    for name in want:
        assert got[name].gain == pytest.approx(want[name].gain, rel=1e-5), name


def test_an_encoder_decoders_decoder_norms_are_not_given_the_encoders_mask():
    # BART's decoder runs over the shifted input, which the attention mask does not describe even when
    # the lengths agree: its norms weigh every position, and only the encoder's leave padding out.
    from transformers import BartConfig, BartModel
    torch.manual_seed(0)
    model = BartModel(BartConfig(vocab_size=50, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                 decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                 max_position_embeddings=32)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(torch.rand(module.weight.shape) + 0.5)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    alone = {"input_ids": torch.randint(3, 50, (1, 5), generator=torch.Generator().manual_seed(1)),
             "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    padded = {"input_ids": torch.cat([alone["input_ids"], torch.ones(1, 7, dtype=torch.long)], 1),  # BART pads with 1
              "attention_mask": torch.cat([alone["attention_mask"], torch.zeros(1, 7, dtype=torch.long)], 1)}
    inputs = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda mod, args, out, n=n: inputs.__setitem__(n, args[0])) for n in names]
    with torch.no_grad():
        model(**padded)
    for hook in hooks:
        hook.remove()
    want, got = find_sites(model, names, alone), find_sites(model, names, padded)
    assert any(n.startswith("encoder.") for n in got) and any(n.startswith("decoder.") for n in got)
    for name, site in got.items():
        if name.startswith("encoder."):
            assert site.gain == pytest.approx(want[name].gain, rel=1e-5), name
        else:  # every decoder position, from the definition
            x = inputs[name]
            weights = torch.nn.functional.layer_norm(x, x.shape[-1:]).pow(2).reshape(-1, x.shape[-1]).mean(0)
            gamma = model.get_submodule(name).weight.detach()
            assert site.gain == pytest.approx(float((gamma * weights).sum() / weights.sum()), rel=1e-5), name
