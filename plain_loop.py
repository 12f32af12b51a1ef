"""The training loop with nothing but the maths: what fine-tuning BERT is, in ~30 lines.

For each epoch: cut the training rows into batches of similar length (little padding), and for each
batch
    logits = model(input_ids, mask)           (B, 4)
    loss   = cross_entropy(logits, labels)    the mean over the batch
    loss.backward()                           d loss / d w into every parameter's .grad
    clip the gradient's norm to `clip`        one odd batch cannot throw the weights far
    AdamW step, zero the gradients            w -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * w)
    the schedule's next rate                  linear warm-up, then linear decay to 0
then score the validation rows. The warm-up matters for a pretrained model: AdamW's first steps,
with moment estimates from a handful of batches, are large, and at the full rate they would undo
what pre-training learned before the estimates settle.

This is fp32 on one process, with no resume point and no options. loop.py's train() is the same
loop as every script runs it (lesson 10); tests/test_loop.py trains one tiny model with both and
finds the same weights.

Lesson 3 of README's reading path: read after bert.py; next: dropout.py.
"""
import torch
import torch.nn.functional as F

import common


def train_plain(model, data, args, runtime):
    """Fine-tune `model` on data["train"], validating on data["val"] after each epoch. `data` maps
    train/val to Encoded splits (common.py: token ids, lengths, labels); args holds lr,
    weight_decay, warmup, clip, epochs, batch_size, seed. Returns the val metrics of each epoch."""
    train_split = data["train"]
    model.to(runtime.device)
    steps_per_epoch = len(common.make_batches(train_split.lengths, args.batch_size, shuffle=False))
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    scheduler = warmup_linear_decay(optimizer, steps_per_epoch * args.epochs, args.warmup)
    history = []
    for epoch in range(args.epochs):
        torch.manual_seed(args.seed * 1000 + epoch)  # this epoch's dropout masks
        model.train()
        for rows in common.make_batches(train_split.lengths, args.batch_size, shuffle=True,
                                        seed=args.seed * 1000 + epoch):
            input_ids, mask, labels = batch_tensors(train_split, rows, 0, runtime.device)
            logits = model(input_ids, mask)                  # (B, 4)
            loss = F.cross_entropy(logits, labels)           # mean over the batch
            loss.backward()                                  # gradients into p.grad
            # Clip the gradient's norm, so that one odd batch cannot throw the weights far.
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()  # AdamW: w -= lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * w)
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()                                 # warm-up, then linear decay to 0
        val_probs = common.predict(model, data["val"], runtime, desc="scoring val")
        history.append(common.evaluate(val_probs, data["val"].labels))
    return history


def batch_tensors(split, rows, pad_to, device):
    """The rows `rows` of an Encoded split as (input_ids (B, T), attention_mask (B, T), labels (B,))
    on device; pad_to=0 pads to the longest row of the batch."""
    input_ids, mask = common.to_device([split.ids[j] for j in rows], pad_to, device)
    labels = torch.from_numpy(split.labels[rows]).to(device, non_blocking=True)
    return input_ids, mask, labels


def make_optimizer(model, lr, weight_decay):
    """AdamW over the trainable parameters, weight decay on matrices only: decaying biases and
    LayerNorm gains pulls them towards 0, which only hurts. Fused where torch has the kernel: one
    kernel updates every parameter, where the default runs ~10 small ops over each tensor."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = params[0].device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


def warmup_linear_decay(optimizer, total_steps, warmup_fraction):
    """The rate's factor at each step: from 1/warmup up to 1 over the first warmup_fraction of the
    steps, then down to 0 at the last."""
    warmup = max(1, int(total_steps * warmup_fraction))
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
