"""What a Swin Transformer's window attention can show.

A Swin has no class token and its windows change from block to block (shifted, then merged),
so there is no class-token map and no rollout over the whole model. What each block does
have is, for every token, the attention it receives from the queries of its own window: the
column means of the window's attention matrix, put back where the tokens lie in the map.
"""

import numpy as np

SWIN_ATTENTION_NOTE = (
    "Swin has no class token, and its windows move between blocks, so there is no rollout: "
    "each head panel shows how much attention every token receives from the queries of its "
    "window (column means) in the last block of the first stage; the last panel averages that "
    "over the first stage's blocks and heads")


def attention_received(probs, batch, size, window, shift=(0, 0)):
    """(B, heads, H, W): each token's mean attention from the queries of its window.

    probs: (B·nW, heads, N, N) window-attention probabilities of one block whose (H, W) map
    was rolled by −shift and cut into wh×ww windows (N = wh·ww)."""
    (height, width), (wh, ww) = size, window
    heads = probs.shape[1]
    received = np.asarray(probs).mean(axis=2)  # (B·nW, heads, N)
    tiles = received.reshape(batch, height // wh, width // ww, heads, wh, ww)
    maps = tiles.transpose(0, 3, 1, 4, 2, 5).reshape(batch, heads, height, width)
    return np.roll(maps, shift, axis=(2, 3))  # undo the block's cyclic shift


def swin_attention_maps(model, attentions, batch):
    """(head maps (B, heads, H0, W0) of the last block of stage 0, their mean over that
    stage's blocks and heads (B, H0, W0)) from forward_with_attention's list."""
    stage = model.layers[0]
    maps = [attention_received(probs, batch, block.size, block.window, block.shift)
            for block, probs in zip(stage.blocks, attentions)]
    return maps[-1], np.mean([m.mean(axis=1) for m in maps], axis=0)
