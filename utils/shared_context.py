"""Multiple-choice scoring with each context run once.

lm-eval's HFLM scores every (context, choice) pair as a whole sequence, so a 4-way question runs its context
through the model 4 times (its own TODO: "lumps together requests with the same context"). SharedContextLM runs
the tokens of a context once, copies their KV cache to each of its choices, and runs only the choices' tokens:
the same log-likelihoods (each token still sees the same tokens at the same positions, and the quantizers work
per token, the KV cache's included) up to float rounding, for a fraction of the compute (a context is most of
a question's tokens). batch_size counts contexts here (each brings all its choices). Requests whose context no
other request shares, or that lm-eval would cut from the left, go through HFLM's own path.
"""
import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm


def _padded(rows, device, pad=0):
    """[len(rows), longest] ids padded on the right, and its 0/1 mask."""
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask


class SharedContextLM(HFLM):
    def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
        batch = override_bs or self.batch_size
        if self.backend != "causal" or not str(batch).isdigit():  # "auto" batch sizes: HFLM's own path
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        # A sliding window (Mistral; Qwen2 with use_sliding_window) counts cache slots, which another context's
        # padding would add to: one context per pass there.
        per_pass = 1 if getattr(self.model.config.get_text_config(), "sliding_window", None) else int(batch)
        groups = {}
        for i, (_, context, _) in enumerate(requests):
            groups.setdefault(tuple(context), []).append(i)
        shared, rest = [], []  # (longest choice, context, members) of the shared contexts; the other requests
        for context, members in groups.items():
            longest = max(len(requests[i][2]) for i in members)
            if len(members) > 1 and len(context) > 1 and len(context) + longest <= self.max_length + 1:
                shared.append((longest, context, members))
            else:
                rest += members
        # passes of similar lengths (little padding), the choices' first: they run 4 times as many rows
        shared = [(c, m) for _, c, m in sorted(shared, key=lambda g: (g[0], len(g[1])), reverse=True)]
        scores = [None] * len(requests)
        if rest:
            for i, score in zip(rest, super()._loglikelihood_tokens([requests[i] for i in rest], disable_tqdm,
                                                                     override_bs)):
                scores[i] = score
        with tqdm(total=len(requests) - len(rest), disable=disable_tqdm or self.rank != 0,
                  desc="Running loglikelihood requests (shared contexts)") as bar:
            for start in range(0, len(shared), per_pass):
                part = shared[start:start + per_pass]
                members = [i for _, m in part for i in m]
                for i, score in zip(members, self._score(part, [requests[i][2] for i in members])):
                    scores[i] = score
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
                bar.update(len(members))
        return scores

    def _score(self, part, continuations):
        """(log-likelihood, greedy) of each continuation of these contexts: the contexts but their last token in
        one forward pass (its KV cache), then each continuation after its context's last token."""
        prefix, mask = _padded([list(c[:-1]) for c, _ in part], self.device)
        cache = self.model(input_ids=prefix, attention_mask=mask, use_cache=True, logits_to_keep=1).cache
        owner = torch.tensor([g for g, (_, m) in enumerate(part) for _ in m], device=self.device)
        cache.reorder_cache(owner)  # each continuation its own copy of its context's cache
        tails, tail_mask = _padded([[part[g][0][-1]] + cont[:-1] for g, cont in zip(owner.tolist(), continuations)],
                                   self.device)
        positions = mask.sum(1)[owner, None] + torch.arange(tails.shape[1], device=self.device)
        logits = self.model(input_ids=tails, attention_mask=torch.cat([mask[owner], tail_mask], 1),
                            position_ids=positions, cache=cache, use_cache=True).logits
        logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
        out = []
        for row, cont in zip(logprobs, continuations):
            target = torch.tensor(cont, device=self.device)
            picked = row[:len(cont)]
            out.append((float(picked.gather(1, target[:, None]).sum()), bool((picked.argmax(-1) == target).all())))
        return out
