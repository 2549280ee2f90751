"""TarFlow: a transformer autoregressive flow on image patches (Zhai et al., 2024).

An image is cut into T patches (tokens) of D = p * p * C values. Each of the blocks runs a
causal transformer over its tokens; its output for token t - 1 gives the affine pair
(a_t, b_t) of token t, and ``fastflow.tarflow_head`` maps x_t to z_t = (x_t - b_t) exp(-a_t)
with log-det -sum(a). Blocks alternate between the natural token order and the reversed
one; the head writes each block's z directly in the next block's order (and the last
block's in the natural order), so no permutation is ever copied.

Sampling inverts the blocks from the last to the first; inside a block, token t needs the
transformer over tokens < t. ``method="sequential"`` runs one transformer step per token
against a preallocated key/value cache of static shape (the position lives in a device
tensor, so one CUDA graph per block replays every token); ``method="jacobi"`` updates all
tokens together from the previous iterate until the largest change is under ``tol``, the
test read by the host once every ``check_every`` iterations. Classifier-free guidance
doubles the batch inside the same step (conditional rows, then the null class).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .ops._checks import (assert_on_device, check_bool, check_choice, check_finite,
                          check_float_tensor, check_module_device, first_parameter)
from .ops.tarflow import HeadSampler, tarflow_head

METHODS = ("sequential", "jacobi")
CACHES = ("static", "cat", "none")  # the KV-cache sampler, the published cat-grown one, naive


class _Layer(nn.Module):
    """A pre-norm transformer layer: causal self-attention, then an MLP."""

    def __init__(self, channels: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.norm2 = nn.LayerNorm(channels)
        self.fc1 = nn.Linear(channels, mlp_ratio * channels)
        self.fc2 = nn.Linear(mlp_ratio * channels, channels)

    def _qkv(self, u):
        b, t, c = u.shape
        qkv = self.qkv(self.norm1(u)).view(b, t, 3, self.heads, c // self.heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head_dim)

    def _finish(self, u, att):
        b, _, t, _ = att.shape
        u = u + self.proj(att.transpose(1, 2).reshape(b, t, -1))
        return u + self.fc2(F.gelu(self.fc1(self.norm2(u))))

    def forward(self, u):
        q, k, v = self._qkv(u)
        return self._finish(u, F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def step(self, u, kv_cache, pos, mask):
        """One token ``u`` (B, 1, C) at device position ``pos`` against a static cache
        ``kv_cache`` (B, T, 2, heads, head_dim): the token's key and value are written at
        ``pos`` in one copy, and the query attends to the positions that the additive
        ``mask`` (1, 1, 1, T) leaves open (0 up to pos, -inf after)."""
        b, _, c = u.shape
        qkv = self.qkv(self.norm1(u)).view(b, 1, 3, self.heads, c // self.heads)
        # under autocast qkv is bfloat16/float16 and the cache keeps the model's dtype
        kv_cache.index_copy_(1, pos, qkv[:, :, 1:].to(kv_cache.dtype))
        q = qkv[:, :, 0].transpose(1, 2)
        k, v = kv_cache[:, :, 0].transpose(1, 2), kv_cache[:, :, 1].transpose(1, 2)
        return self._finish(u, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))

    def step_cat(self, u, cache: list):
        """The published sampler's step: the cache grows by concatenation (a copy of the
        whole past at every token)."""
        q, k, v = self._qkv(u)
        if cache:
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        cache[:] = [k, v]
        return self._finish(u, F.scaled_dot_product_attention(q, k, v))


class _Block(nn.Module):
    """One autoregressive flow block: input projection, learned positions (and class
    embedding), causal transformer layers, and a zero-initialised projection to (a, b)."""

    def __init__(self, dim, tokens, channels, layers, heads, num_classes):
        super().__init__()
        self.proj_in = nn.Linear(dim, channels)
        self.pos_emb = nn.Parameter(torch.randn(tokens, channels) * 0.02)
        # the last row is the null class of classifier-free guidance
        self.class_emb = nn.Embedding(num_classes + 1, channels) if num_classes else None
        if self.class_emb is not None:
            nn.init.normal_(self.class_emb.weight, std=0.02)
        self.layers = nn.ModuleList(_Layer(channels, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(channels)
        self.proj_out = nn.Linear(channels, 2 * dim)
        nn.init.zeros_(self.proj_out.weight)  # every block starts as the identity
        nn.init.zeros_(self.proj_out.bias)

    def condition(self, labels):
        """(B, 1, C) class embeddings, or None for an unconditional model."""
        return None if self.class_emb is None else self.class_emb(labels).unsqueeze(1)

    def _embed(self, x, pos_emb, cond):
        u = self.proj_in(x) + pos_emb
        return u if cond is None else u + cond

    def forward(self, x, cond):
        """The transformer over all tokens: (B, T, D) -> (B, T, 2D)."""
        u = self._embed(x, self.pos_emb[: x.shape[1]], cond)
        for layer in self.layers:
            u = layer(u)
        return self.proj_out(self.norm(u))

    def step_table(self, cond, rows):
        """(B, T, C): position embedding + class embedding + the input projection's bias,
        added once per block so that a token's embedding is one matrix product."""
        table = self.pos_emb + self.proj_in.bias
        table = table.unsqueeze(0) if cond is None else table + cond
        return table.expand(rows, -1, -1)

    def step(self, inp, pos, caches, table, mask):
        """The transformer at one token ``inp`` (B, D) at device position ``pos``: (B, 2D)."""
        u = torch.addmm(table.index_select(1, pos).squeeze(1), inp, self.proj_in.weight.t())
        u = u.unsqueeze(1)
        for layer, kv in zip(self.layers, caches):
            u = layer.step(u, kv, pos, mask)
        return self.proj_out(self.norm(u)).squeeze(1)

    def step_cat(self, inp, pos, caches, cond):
        u = self._embed(inp.unsqueeze(1), self.pos_emb.index_select(0, pos), cond)
        for layer, cache in zip(self.layers, caches):
            u = layer.step_cat(u, cache)
        return self.proj_out(self.norm(u)).squeeze(1)


class TarFlow(nn.Module):
    """TarFlow with apple/ml-tarflow's constructor arguments.

    ``forward(x, y=None) -> (z, logdet)``: x (N, in_channels, img_size, img_size), z the
    tokens (N, T, D) with T = (img_size / patch_size)^2 and D = patch_size^2 * in_channels,
    logdet (N,). ``reverse(z, y=None, guidance=0.0, method="sequential")`` maps tokens (or
    image-shaped z) back to images; ``sample(n, ...)`` draws z ~ N(0, temperature^2) and
    reverses it, then removes the training noise with one score step when ``noise_std`` > 0.

    Keyword-only extras: ``head_dim`` (attention heads = channels // head_dim), ``clamp``
    (soft clamp of the log-scale a, None for none), ``noise_std`` (the Gaussian noise the
    model is trained with; the denoising step uses it), ``class_dropout`` (the probability
    that a training label is replaced by the null class, for classifier-free guidance)."""

    def __init__(self, in_channels: int, img_size: int, patch_size: int, channels: int,
                 num_blocks: int, layers_per_block: int, num_classes: int = 0, *,
                 head_dim: int = 64, clamp: float | None = None, noise_std: float = 0.0,
                 class_dropout: float = 0.1):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("img_size", img_size),
                        ("patch_size", patch_size), ("channels", channels),
                        ("num_blocks", num_blocks), ("layers_per_block", layers_per_block),
                        ("head_dim", head_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if img_size % patch_size:
            raise ValueError(f"patch_size: expected a divisor of img_size={img_size}, got {patch_size}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes: expected a non-negative integer, got {num_classes!r}")
        if clamp is not None and (isinstance(clamp, bool) or not isinstance(clamp, (int, float))
                                  or not 0.0 < clamp < math.inf):
            # (inf made every log-scale inf * tanh(0) = NaN; 0 was refused at the first call)
            raise ValueError(f"clamp: expected None (no clamp) or a finite number > 0, got "
                             f"{clamp!r}")
        if not (isinstance(noise_std, (int, float)) and 0.0 <= noise_std < math.inf):
            raise ValueError(f"noise_std: expected a finite number >= 0, got {noise_std!r}")
        if not (isinstance(class_dropout, (int, float)) and 0.0 <= class_dropout <= 1.0):
            raise ValueError(f"class_dropout: expected a probability in [0, 1], got "
                             f"{class_dropout!r}")
        heads = max(1, channels // head_dim)
        if channels % heads:
            raise ValueError(f"channels: expected a multiple of the {heads} attention heads "
                             f"(channels // head_dim), got {channels}")
        self.in_channels, self.img_size, self.patch_size = in_channels, img_size, patch_size
        self.num_classes, self.clamp = num_classes, clamp
        self.noise_std, self.class_dropout = float(noise_std), float(class_dropout)
        self.tokens = (img_size // patch_size) ** 2
        self.dim = patch_size * patch_size * in_channels
        self.heads = heads
        self.blocks = nn.ModuleList(
            _Block(self.dim, self.tokens, channels, layers_per_block, heads, num_classes)
            for _ in range(num_blocks))

    # ---- layout ------------------------------------------------------------------------

    def patchify(self, x):
        """(N, C, H, W) -> (N, T, D), tokens in raster order, each patch as (p, p, C)."""
        n, c, hh, ww = x.shape
        p = self.patch_size
        x = x.reshape(n, c, hh // p, p, ww // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(n, self.tokens, self.dim)

    def unpatchify(self, z):
        n, p, c = z.shape[0], self.patch_size, self.in_channels
        g = self.img_size // p
        x = z.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(n, c, self.img_size, self.img_size)

    def order(self, k: int) -> str:
        """The token order block ``k``'s head writes in, relative to block k's own order:
        blocks alternate natural / reversed, so every block but the last writes "reversed";
        the last one writes the natural order."""
        if k < len(self.blocks) - 1:
            return "reversed"
        return "reversed" if k % 2 else "same"

    # ---- checks and labels -------------------------------------------------------------

    def _check_x(self, x, name="x"):
        check_float_tensor(name, x, ndim=4)
        want = (self.in_channels, self.img_size, self.img_size)
        if tuple(x.shape[1:]) != want:
            raise ValueError(f"{name}: expected shape (N, {want[0]}, {want[1]}, {want[2]}), got "
                             f"{tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name}: expected at least one sample, shape (N >= 1, {want[0]}, "
                             f"{want[1]}, {want[2]}), got {tuple(x.shape)}")
        check_module_device(name, x, first_parameter(self))

    def _labels(self, y, n, device, drop=False):
        """(N,) class indices: the null class when ``y`` is None (None for an unconditional
        model); with ``drop`` each label is replaced by the null class with probability
        ``class_dropout`` (drawn on the device, no host sync)."""
        if self.num_classes == 0:
            if y is not None:
                raise ValueError("y: this TarFlow has num_classes=0, so it takes no labels")
            return None
        null = torch.full((n,), self.num_classes, dtype=torch.long, device=device)
        if y is None:
            return null
        if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.is_complex():
            raise TypeError(f"y: expected an integer tensor of class indices, got "
                            f"{getattr(y, 'dtype', type(y).__name__)}")
        if tuple(y.shape) != (n,):
            raise ValueError(f"y: expected shape ({n},), one label per sample, got {tuple(y.shape)}")
        expected = f"y: expected class indices in [0, {self.num_classes})"
        if y.device.type == "cpu":  # read in place (no op, nothing to wait for)
            values = y.detach().numpy()
            if values.size and (values.min() < 0 or values.max() >= self.num_classes):
                raise ValueError(f"{expected}, got values from {values.min()} to "
                                 f"{values.max()}")
        else:  # reading them would wait for the device; y == num_classes would silently
            # count as the null class
            assert_on_device(((y >= 0) & (y < self.num_classes)).all(), expected)
        y = y.to(device=device, dtype=torch.long)
        if drop and self.class_dropout > 0:
            y = torch.where(torch.rand(n, device=device) < self.class_dropout, null, y)
        return y

    # ---- density -----------------------------------------------------------------------

    def forward(self, x, y=None, *, drop_labels: bool | None = None):
        """(z, logdet): z the tokens (N, T, D) in natural order, logdet (N,).

        ``drop_labels`` (default: in training mode) replaces each label by the null class
        with probability ``class_dropout``, which trains the unconditional model that
        classifier-free guidance needs."""
        self._check_x(x)
        drop = self.training if drop_labels is None else check_bool("drop_labels", drop_labels)
        labels = self._labels(y, x.shape[0], x.device, drop)
        u = self.patchify(x)
        logdet = None
        for k, block in enumerate(self.blocks):
            h = block(u, block.condition(labels))
            u, ld = tarflow_head(u, h, clamp=self.clamp, order=self.order(k))
            logdet = ld if logdet is None else logdet + ld
        return u, logdet

    def log_prob(self, x, y=None, *, drop_labels: bool | None = None):
        """log p(x) per sample (N,): the standard normal log-density of z plus the log-det."""
        z, logdet = self(x, y, drop_labels=drop_labels)
        zf = z.to(logdet.dtype).flatten(1)
        return -0.5 * (zf * zf).sum(1) - 0.5 * math.log(2 * math.pi) * zf.shape[1] + logdet

    def denoise(self, x, y=None):
        """One score step ``x + noise_std^2 * grad_x log p(x)``: removes the Gaussian noise
        the model was trained with (Tweedie's formula). Works under ``torch.no_grad`` and
        ``torch.inference_mode`` too (inference tensors are copied out of it)."""
        with torch.inference_mode(False), torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            y = y.clone() if isinstance(y, torch.Tensor) else y
            (grad,) = torch.autograd.grad(self.log_prob(xg, y, drop_labels=False).sum(), xg)
        return (x + self.noise_std ** 2 * grad).detach()

    # ---- sampling ----------------------------------------------------------------------

    def _tokens(self, z):
        if z.dim() == 4:
            self._check_x(z, "z")
            return self.patchify(z)
        check_float_tensor("z", z, ndim=3)
        if tuple(z.shape[1:]) != (self.tokens, self.dim):
            raise ValueError(f"z: expected tokens (N, {self.tokens}, {self.dim}) or an image "
                             f"(N, {self.in_channels}, {self.img_size}, {self.img_size}), "
                             f"got {tuple(z.shape)}")
        if z.shape[0] == 0:
            raise ValueError(f"z: expected at least one sample, shape (N >= 1, {self.tokens}, "
                             f"{self.dim}), got {tuple(z.shape)}")
        check_module_device("z", z, first_parameter(self))
        return z

    @torch.no_grad()
    def reverse(self, z, y=None, guidance: float = 0.0, method: str = "sequential", *,
                tol: float = 1e-4, check_every: int = 4, cache: str = "static",
                graphs: bool | None = None, stats: dict | None = None):
        """Images (N, C, H, W) from z (tokens (N, T, D), or image-shaped).

        ``guidance`` w: classifier-free guidance p_c + w (p_c - p_u) on each token's (a, b);
        needs a class-conditional model (``y`` None means the null class). ``method``:
        "sequential" (token by token against a static KV cache; ``cache="cat"`` and
        ``"none"`` are the published cat-grown cache and the naive recompute, kept for
        comparison) or "jacobi" (all tokens per iteration until the largest change < ``tol``,
        read on the host every ``check_every`` iterations). ``graphs``: replay each block's
        token step as a CUDA graph (default: on for CUDA tensors with the static cache).
        ``stats``: a dict that receives ``"jacobi_iterations"`` per block (one extra read)."""
        check_choice("method", method, METHODS)
        check_choice("cache", cache, CACHES)
        if isinstance(check_every, bool) or not (isinstance(check_every, int) and check_every >= 1):
            raise ValueError(f"check_every: expected a positive integer, got {check_every!r}")
        guidance = check_finite("guidance", guidance)  # NaN or inf: all-NaN samples
        u = self._tokens(z)
        n = u.shape[0]
        guided = guidance != 0.0
        if guided and self.num_classes == 0:
            raise ValueError(f"guidance: classifier-free guidance needs a class-conditional "
                             f"TarFlow (num_classes > 0), got guidance={guidance}")
        if guided and y is None:
            raise ValueError(f"guidance: classifier-free guidance steers towards the labels y; "
                             f"got guidance={guidance} and y=None")
        labels = self._labels(y, n, u.device)
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, self.num_classes)])
        if graphs is None:
            graphs = u.is_cuda and cache == "static" and method == "sequential"
        check_bool("graphs", graphs)
        caches = None
        iterations = []
        for k in reversed(range(len(self.blocks))):
            block = self.blocks[k]
            cond = block.condition(labels)
            kw = dict(clamp=self.clamp, order=self.order(k), guidance=guidance, guided=guided)
            if method == "jacobi":
                u = self._jacobi_block(block, u, cond, kw, tol, check_every, iterations)
                continue
            if cache == "static" and caches is None:
                caches = self._new_caches(u, 2 * n if guided else n)
            u = self._sequential_block(block, u, cond, kw, cache, caches, graphs)
        if stats is not None and iterations:
            stats["jacobi_iterations"] = [int(i) for i in torch.stack(iterations[::-1]).tolist()]
        return self.unpatchify(u)

    def _new_caches(self, u, rows):
        """Zeroed (so that masked positions hold no NaN) key/value buffers shared by every
        block: each block overwrites positions 0..T-2 before it attends to them."""
        layer = self.blocks[0].layers[0]
        shape = (rows, self.tokens, 2, self.heads, layer.qkv.in_features // self.heads)
        return [u.new_zeros(shape) for _ in self.blocks[0].layers]

    def _sequential_block(self, block, z, cond, kw, cache, caches, graphs):
        n, t_count, d = z.shape
        rows = 2 * n if kw["guided"] else n
        x = torch.empty_like(z)
        inp = z.new_empty(rows, d)
        pos = torch.zeros(1, dtype=torch.long, device=z.device)
        head = HeadSampler(z, x, inp, pos, **kw)
        head.first()
        if t_count == 1:
            return x
        if cache == "static":
            table = block.step_table(cond, rows)
            mask = z.new_full((1, 1, 1, t_count), float("-inf"))

            def step():
                mask.index_fill_(-1, pos, 0.0)  # open position pos
                head.step(block.step(inp, pos, caches, table, mask))
                pos.add_(1)
        elif cache == "cat":
            grown = [[] for _ in block.layers]

            def step():
                head.step(block.step_cat(inp, pos, grown, cond))
                pos.add_(1)
        else:
            prefix_len = [1]

            def step():  # the whole transformer over the prefix, for the last output only
                t = prefix_len[0]
                xin = x[:, :t].repeat(rows // n, 1, 1)
                head.step(block(xin, cond)[:, t - 1])
                pos.add_(1)
                prefix_len[0] += 1

        if graphs and z.is_cuda and cache == "static":
            _replay_as_graph(step, t_count - 1)
        else:
            for _ in range(t_count - 1):
                step()
        return x

    def _jacobi_block(self, block, z, cond, kw, tol, check_every, iterations):
        n, t_count, _ = z.shape
        rows = 2 * n if kw["guided"] else n
        buf = z.new_zeros(rows, t_count, z.shape[2])  # the iterate (both halves when guided)
        head = HeadSampler(z, None, None, None, **kw)
        changes = z.new_zeros(t_count, dtype=torch.float64 if z.dtype == torch.float64
                              else torch.float32)
        done = t_count  # after T iterations every token is exact (token t after t + 1)
        for i in range(t_count):
            changes[i] = head.jacobi(block(buf, cond), buf)
            if (i + 1) % check_every == 0 and i + 1 < t_count and bool(changes[i] < tol):
                done = i + 1
                break
        below = (changes[:done] < tol).to(torch.long)
        # iterations until the first change under tol (T if none): stays on the device
        first = torch.where(below.any(), below.argmax() + 1, torch.full((), done, device=z.device))
        iterations.append(first)
        return buf[:n]

    def sample(self, n: int, y=None, temperature: float = 1.0, guidance: float = 0.0,
               method: str = "sequential", *, generator=None, denoise: bool = True, **kw):
        """``n`` images: z ~ N(0, temperature^2) reversed (``reverse``'s keywords pass
        through), then one denoising score step when the model has ``noise_std`` > 0."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n: expected a positive integer, got {n!r}")
        temperature = check_finite("temperature", temperature)
        check_bool("denoise", denoise)
        p = next(self.parameters())
        z = torch.randn(n, self.tokens, self.dim, generator=generator, device=p.device,
                        dtype=p.dtype) * temperature
        x = self.reverse(z, y, guidance=guidance, method=method, **kw)
        if denoise and self.noise_std > 0:
            x = self.denoise(x, y)
        return x


def _replay_as_graph(step, count: int):
    """Run ``step`` ``count`` times: once eagerly on a side stream (compiles the kernels,
    warms the allocator; it is a real step), then captured in a CUDA graph replayed for the
    rest. The step reads its position from a device tensor, so every replay is valid."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    if count == 1:
        return
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(count - 1):
        graph.replay()
