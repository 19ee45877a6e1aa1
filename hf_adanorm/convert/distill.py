"""What the student (the model with the new norms) is trained to reproduce of the teacher (the
original model), and the drift figures of the report.

With T = teacher, S = student, m the attention mask and ``pool`` the masked mean over tokens:

- ``logits`` (causal LMs, and any model whose output has logits): the mean over unmasked
  tokens of KL(softmax(T) ‖ softmax(S)), in nats.
- ``hidden`` (encoders): the mean over unmasked tokens of 1 − cos(S_t, T_t) on the last
  hidden state, plus 1 − cos(pool(S), pool(T)) on the mean-pooled embedding. Cosines make
  the loss blind to the per-token scale, which LayerNorm-simple and AdaNorm cannot keep.
- ``classifier`` (a sequence classifier): the mean over sequences of KL(softmax(T) ‖ softmax(S))
  of the class logits, plus ``hidden`` on the encoder's last hidden state: the predictions, and
  the representation that further fine-tuning starts from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OBJECTIVES = ("auto", "logits", "hidden", "classifier")
# What each objective needs from a forward pass beyond the default outputs.
FORWARD_OPTIONS = {"classifier": {"output_hidden_states": True}}


def choose_objective(objective: str, output, kind: str = "base") -> str:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    classifier = kind == "sequence_classification"
    if objective == "classifier" and not classifier or classifier and objective not in ("auto", "classifier"):
        raise ValueError(f"objective {objective!r} does not fit a {kind} model: 'classifier' is the objective "
                         "of a sequence classifier (--model_class sequence_classification), and its only one: "
                         "it keeps both the predictions and the representation")
    if objective == "auto":
        if kind == "sequence_classification":
            return "classifier"
        return "logits" if getattr(output, "logits", None) is not None else "hidden"
    if objective == "logits" and getattr(output, "logits", None) is None:
        raise ValueError("objective 'logits' needs a model whose output has logits (a model with a head); "
                         "use 'hidden' for a bare encoder")
    return objective


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens: the sentence embedding of sentence-transformers' mean pooling."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


def token_kl(teacher_logits, student_logits, mask) -> torch.Tensor:
    t = F.log_softmax(teacher_logits.float(), -1)
    s = F.log_softmax(student_logits.float(), -1)
    kl = (t.exp() * (t - s)).sum(-1)
    if kl.dim() == 1:  # one prediction per example (a classification head)
        return kl.mean()
    return masked_mean(kl, mask)


def hidden_loss(teacher_hidden, student_hidden, mask) -> torch.Tensor:
    t, s = teacher_hidden.float(), student_hidden.float()
    per_token = 1 - F.cosine_similarity(s, t, dim=-1)
    pooled = 1 - F.cosine_similarity(pool(s, mask), pool(t, mask), dim=-1)
    return masked_mean(per_token, mask) + pooled.mean()


def distill_loss(objective: str, teacher_out, student_out, mask) -> torch.Tensor:
    if objective == "logits":
        return token_kl(teacher_out.logits, student_out.logits, mask)
    if objective == "classifier":
        return (token_kl(teacher_out.logits, student_out.logits, mask)
                + hidden_loss(teacher_out.hidden_states[-1], student_out.hidden_states[-1], mask))
    return hidden_loss(teacher_out.last_hidden_state, student_out.last_hidden_state, mask)


@torch.no_grad()
def drift(teacher_out, student_out, mask, next_tokens=None) -> dict:
    """Per-batch sums of the drift figures (divide by the counts to average). With the input ids
    of a causal LM as ``next_tokens``, also each model's cross-entropy on the text itself."""
    mask = mask.bool()
    out = {}
    if next_tokens is not None:
        targets, keep = next_tokens[:, 1:], mask[:, 1:]
        for who, result in (("teacher", teacher_out), ("student", student_out)):
            ce = F.cross_entropy(result.logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
            out[f"{who}_lm_loss"] = ce[keep].sum().item()
        out["lm_tokens"] = int(keep.sum())
    t_states = getattr(teacher_out, "hidden_states", None)
    s_states = getattr(student_out, "hidden_states", None)
    if t_states is not None and s_states is not None:
        # per layer: mean token cosine of the residual stream, teacher vs student
        out["layer_cosine"] = [F.cosine_similarity(s.float(), t.float(), dim=-1)[mask].sum().item()
                               for t, s in zip(t_states, s_states)]
    if getattr(teacher_out, "logits", None) is not None:
        t, s = teacher_out.logits.float(), student_out.logits.float()
        kl = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1)
        out["kl"] = kl[mask].sum().item() if kl.dim() == 2 else kl.sum().item()
        out["kl_count"] = int(mask.sum()) if kl.dim() == 2 else kl.shape[0]
        if kl.dim() == 1:  # a classifier: how many of its predictions the student keeps
            out["agreement"] = int((t.argmax(-1) == s.argmax(-1)).sum())
    # Encoders only: an LM's last hidden state is not its output (and a fold changes it exactly
    # where the logits stay the same). A classifier's encoder output is its last hidden state.
    last_t = getattr(teacher_out, "last_hidden_state", None)
    last_s = getattr(student_out, "last_hidden_state", None)
    if last_t is None and "agreement" in out and t_states is not None and s_states is not None:
        last_t, last_s = t_states[-1], s_states[-1]
    if last_t is not None and last_s is not None:
        pooled = F.cosine_similarity(pool(last_s.float(), mask), pool(last_t.float(), mask), dim=-1)
        out["embedding_cosine"] = pooled.sum().item()
        diff = (last_s.float() - last_t.float()).norm(dim=-1)[mask]
        out["relative_error"] = (diff / last_t.float().norm(dim=-1)[mask].clamp_min(1e-12)).sum().item()
    out["tokens"] = int(mask.sum())
    out["sequences"] = int(mask.shape[0])
    return out
