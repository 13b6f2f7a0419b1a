"""Small, realistic one-layer problems: W ~ trained-like weights, X with a few outlier channels as in LLMs."""

import torch


def layer_problem(out_features=96, in_features=128, tokens=2048, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen) * in_features**-0.5
    mix = (
        torch.eye(in_features)
        + 0.3 * torch.randn(in_features, in_features, generator=gen) * in_features**-0.5
    )
    x = torch.randn(tokens, in_features, generator=gen) @ mix
    x[:, :4] *= 12.0  # outlier features, as LLM activations have
    gram = x.T @ x / tokens
    return weight, gram
