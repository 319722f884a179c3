"""The synthetic preference task of the study: an oracle decides which response wins.

- A prompt is `prompt_len` tokens from a prompt distribution; its topic is the class of its first token.
  Train prompts and shifted (OOD) prompts draw tokens from different unigram profiles.
- A response comes from one of several response models (each a unigram profile over content tokens);
  train-time models and held-out (OOD) models differ. Responses are 5-10 tokens long.
- The oracle reward is the mean over the response of W[topic, token] (W fixed, random): the winner of two
  responses to one prompt is the one with the higher reward.
- Splits as the AMaPO paper's Table 4: ID (train prompt distribution and response models, unseen pairs),
  Prompt-OOD (shifted prompts, train models), Response-OOD (train prompts, held-out models), Mutual-OOD;
  plus a validation split drawn like ID (fresh pairs), the only one hyperparameters are chosen on.
"""

import torch

import amapo_kernels as ak

BOS, EOS, PAD, FIRST_CONTENT = 0, 1, 2, 3
IGNORE = -100
SPLITS = ("ID", "Prompt-OOD", "Response-OOD", "Mutual-OOD")
# (prompt distribution, response models) of each test split
SPLIT_SOURCES = {"ID": ("train", "train"), "Prompt-OOD": ("ood", "train"),
                 "Response-OOD": ("train", "ood"), "Mutual-OOD": ("ood", "ood")}


class Task:
    """The fixed world of the study: token profiles, response models and the oracle."""

    def __init__(self, config, seed: int = 1234):
        content = config.vocab - FIRST_CONTENT
        self.config = config
        # Dirichlet.sample takes no generator: seed the global RNG, restored afterwards, so that the world is
        # the same in every process whatever ran before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.oracle = torch.randn(config.topics, config.vocab)
            self.prompt_profiles = {
                "train": torch.distributions.Dirichlet(torch.full((content,), 0.5)).sample(),
                "ood": torch.distributions.Dirichlet(torch.full((content,), 0.5)).sample(),
            }
            self.model_profiles = {
                "train": [torch.distributions.Dirichlet(torch.full((content,), 0.3)).sample()
                          for _ in range(config.train_models)],
                "ood": [torch.distributions.Dirichlet(torch.full((content,), 0.3)).sample()
                        for _ in range(config.ood_models)],
            }

    def topic(self, prompt: torch.Tensor) -> int:
        return int(prompt[0]) % self.config.topics

    def reward(self, prompt: torch.Tensor, response: torch.Tensor) -> float:
        return self.oracle[self.topic(prompt), response].mean().item()

    def pairs(self, count: int, prompts: str, models: str, generator: torch.Generator) -> list[dict]:
        """`count` (prompt, chosen, rejected) token lists; chosen has the higher oracle reward."""
        low, high = self.config.response_len
        out = []
        while len(out) < count:
            prompt = FIRST_CONTENT + torch.multinomial(self.prompt_profiles[prompts], self.config.prompt_len,
                                                       replacement=True, generator=generator)
            picks = torch.randperm(len(self.model_profiles[models]), generator=generator)[:2]
            responses = []
            for model in picks.tolist():
                length = int(torch.randint(low, high + 1, (1,), generator=generator))
                responses.append(FIRST_CONTENT + torch.multinomial(self.model_profiles[models][model], length,
                                                                   replacement=True, generator=generator))
            rewards = [self.reward(prompt, r) for r in responses]
            if rewards[0] == rewards[1]:
                continue
            chosen, rejected = (responses[0], responses[1]) if rewards[0] > rewards[1] else (responses[1], responses[0])
            out.append({"prompt": prompt.tolist(), "chosen": chosen.tolist(), "rejected": rejected.tolist()})
        return out

    def seed_data(self, seed: int) -> tuple[list[dict], list[dict], dict]:
        """(train pairs, validation pairs, {test split: pairs}) of one seed, all disjoint draws."""
        generator = torch.Generator().manual_seed(seed)
        train = self.pairs(self.config.train_pairs, "train", "train", generator)
        valid = self.pairs(self.config.eval_pairs, "train", "train", generator)
        tests = {split: self.pairs(self.config.eval_pairs, *SPLIT_SOURCES[split], generator) for split in SPLITS}
        return train, valid, tests


def encode(pairs: list[dict], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) [2N, L]: chosen rows first; labels -100 on bos, prompt and padding."""
    rows = [[BOS, *p["prompt"], *p[side], EOS] for side in ("chosen", "rejected") for p in pairs]
    prompt_lens = [1 + len(p["prompt"]) for _ in ("chosen", "rejected") for p in pairs]
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), PAD)
    labels = torch.full((len(rows), length), IGNORE)
    for i, (row, start) in enumerate(zip(rows, prompt_lens)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, start: len(row)] = torch.tensor(row[start:])
    return ids.to(device), labels.to(device)


def logps_of(model, ids, labels, average=True):
    # Right padding under a causal mask: no real token attends to a pad, so no attention mask is needed.
    return ak.sequence_logps(model(input_ids=ids, use_cache=False).logits, labels, shift=True, average=average)
