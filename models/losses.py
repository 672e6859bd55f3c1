"""The training objective, defined once and implemented per framework.

Batch: ``N = P x K`` images (P products, K photos each); ``labels[i]`` is the product id
(any integers; positives are equal labels), ``types[i]`` the product-type index
(``-1`` = unknown, ignored).  ``e`` = un-normalised embeddings ``[N, D]``.

1. Supervised contrastive loss (SupCon "L_out", Khosla et al. 2020), proxy-free, so it
   works when products are split across clients::

       z_i      = e_i / sqrt(max(|e_i|^2, 1e-12))                  (L2-normalise)
       s_ij     = z_i . z_j / temperature                           (temperature default 0.1)
       A(i)     = {a != i},   P(i) = {p != i : labels[p] == labels[i]}
       lse_i    = m_i + log sum_{a in A(i)} exp(s_ia - m_i),  m_i = max_{a in A(i)} s_ia (no gradient)
       l_i      = -(1 / |P(i)|) sum_{p in P(i)} (s_ip - lse_i)
       supcon   = sum_{i : |P(i)| > 0} l_i / max(#{i : |P(i)| > 0}, 1)

2. Product-type cross entropy, whenever the spec has a type head (reported even when its
   weight is 0)::

       ce_i     = logsumexp(t_i) - t_i[types[i]]      over i with types[i] >= 0
       type_ce  = sum ce_i / max(#valid, 1)

3. FedProx proximal term (``prox_mu > 0``), over every trainable tensor (not BN stats),
   w_global = the weights the round started from (``set_weights``)::

       prox     = prox_mu / 2 * sum_w |w - w_global|^2

   total = supcon + type_weight * type_ce + prox

``numpy_loss`` is the reference; ``torch_loss``, ``tf_loss`` and ``jax_loss`` implement the
same expressions term by term (each imports its framework when first called).
"""
from __future__ import annotations

import numpy as np

NORM_EPS = 1e-12


def numpy_loss(emb, labels, types=None, type_logits=None, temperature=0.1, type_weight=0.0):
    """Reference implementation in float64; returns (total, supcon, type_ce)."""
    e = np.asarray(emb, np.float64)
    labels = np.asarray(labels)
    n = e.shape[0]
    z = e / np.sqrt(np.maximum((e * e).sum(1, keepdims=True), NORM_EPS))
    s = z @ z.T / temperature
    not_self = ~np.eye(n, dtype=bool)
    pos = (labels[:, None] == labels[None, :]) & not_self
    m = np.where(not_self, s, -np.inf).max(1, keepdims=True)
    lse = m[:, 0] + np.log((np.exp(s - m) * not_self).sum(1))
    npos = pos.sum(1)
    li = -((s - lse[:, None]) * pos).sum(1) / np.maximum(npos, 1)
    valid = npos > 0
    supcon = li[valid].sum() / max(valid.sum(), 1)
    ce = 0.0
    if type_logits is not None:
        t = np.asarray(type_logits, np.float64)
        ty = np.asarray(types)
        ok = ty >= 0
        tm = t.max(1, keepdims=True)
        lse_t = tm[:, 0] + np.log(np.exp(t - tm).sum(1))
        picked = t[np.arange(n), np.where(ok, ty, 0)]
        ce = ((lse_t - picked) * ok).sum() / max(ok.sum(), 1)
    return supcon + type_weight * ce, supcon, ce


def torch_loss(emb, labels, types, type_logits, temperature, type_weight):
    import torch

    n = emb.shape[0]
    z = emb * torch.rsqrt(torch.clamp((emb * emb).sum(1, keepdim=True), min=NORM_EPS))
    s = (z @ z.t()) / temperature
    not_self = ~torch.eye(n, dtype=torch.bool, device=emb.device)
    pos = (labels[:, None] == labels[None, :]) & not_self
    nsf = not_self.to(s.dtype)
    m = torch.where(not_self, s, torch.full_like(s, -1e30)).max(1, keepdim=True).values.detach()
    lse = m[:, 0] + torch.log((torch.exp(s - m) * nsf).sum(1))
    posf = pos.to(s.dtype)
    npos = posf.sum(1)
    li = -((s - lse[:, None]) * posf).sum(1) / torch.clamp(npos, min=1.0)
    valid = (npos > 0).to(s.dtype)
    supcon = (li * valid).sum() / torch.clamp(valid.sum(), min=1.0)
    if type_logits is None:
        return supcon, supcon, torch.zeros((), dtype=s.dtype)
    ok = types >= 0
    okf = ok.to(s.dtype)
    tm = type_logits.max(1, keepdim=True).values.detach()
    lse_t = tm[:, 0] + torch.log(torch.exp(type_logits - tm).sum(1))
    onehot = torch.nn.functional.one_hot(torch.where(ok, types, torch.zeros_like(types)),
                                         type_logits.shape[1]).to(s.dtype)
    picked = (type_logits * onehot).sum(1)
    ce = ((lse_t - picked) * okf).sum() / torch.clamp(okf.sum(), min=1.0)
    return supcon + type_weight * ce, supcon, ce


def tf_loss(emb, labels, types, type_logits, temperature, type_weight):
    import tensorflow as tf

    n = tf.shape(emb)[0]
    z = emb * tf.math.rsqrt(tf.maximum(tf.reduce_sum(emb * emb, 1, keepdims=True), NORM_EPS))
    s = tf.matmul(z, z, transpose_b=True) / temperature
    not_self = tf.logical_not(tf.cast(tf.eye(n), tf.bool))
    pos = tf.logical_and(tf.equal(labels[:, None], labels[None, :]), not_self)
    nsf = tf.cast(not_self, s.dtype)
    m = tf.stop_gradient(tf.reduce_max(tf.where(not_self, s, tf.fill(tf.shape(s), -1e30)), 1,
                                       keepdims=True))
    lse = m[:, 0] + tf.math.log(tf.reduce_sum(tf.exp(s - m) * nsf, 1))
    posf = tf.cast(pos, s.dtype)
    npos = tf.reduce_sum(posf, 1)
    li = -tf.reduce_sum((s - lse[:, None]) * posf, 1) / tf.maximum(npos, 1.0)
    valid = tf.cast(npos > 0, s.dtype)
    supcon = tf.reduce_sum(li * valid) / tf.maximum(tf.reduce_sum(valid), 1.0)
    if type_logits is None:
        return supcon, supcon, tf.zeros((), s.dtype)
    ok = types >= 0
    okf = tf.cast(ok, s.dtype)
    tm = tf.stop_gradient(tf.reduce_max(type_logits, 1, keepdims=True))
    lse_t = tm[:, 0] + tf.math.log(tf.reduce_sum(tf.exp(type_logits - tm), 1))
    onehot = tf.one_hot(tf.where(ok, types, tf.zeros_like(types)), tf.shape(type_logits)[1],
                        dtype=s.dtype)
    picked = tf.reduce_sum(type_logits * onehot, 1)
    ce = tf.reduce_sum((lse_t - picked) * okf) / tf.maximum(tf.reduce_sum(okf), 1.0)
    return supcon + type_weight * ce, supcon, ce


def jax_loss(emb, labels, types, type_logits, temperature, type_weight):
    import jax
    import jax.numpy as jnp

    n = emb.shape[0]
    z = emb * jax.lax.rsqrt(jnp.maximum((emb * emb).sum(1, keepdims=True), NORM_EPS))
    s = (z @ z.T) / temperature
    not_self = ~jnp.eye(n, dtype=bool)
    pos = (labels[:, None] == labels[None, :]) & not_self
    nsf = not_self.astype(s.dtype)
    m = jax.lax.stop_gradient(jnp.where(not_self, s, -1e30).max(1, keepdims=True))
    lse = m[:, 0] + jnp.log((jnp.exp(s - m) * nsf).sum(1))
    posf = pos.astype(s.dtype)
    npos = posf.sum(1)
    li = -((s - lse[:, None]) * posf).sum(1) / jnp.maximum(npos, 1.0)
    valid = (npos > 0).astype(s.dtype)
    supcon = (li * valid).sum() / jnp.maximum(valid.sum(), 1.0)
    if type_logits is None:
        return supcon, supcon, jnp.zeros((), s.dtype)
    ok = types >= 0
    okf = ok.astype(s.dtype)
    tm = jax.lax.stop_gradient(type_logits.max(1, keepdims=True))
    lse_t = tm[:, 0] + jnp.log(jnp.exp(type_logits - tm).sum(1))
    onehot = jax.nn.one_hot(jnp.where(ok, types, 0), type_logits.shape[1], dtype=s.dtype)
    picked = (type_logits * onehot).sum(1)
    ce = ((lse_t - picked) * okf).sum() / jnp.maximum(okf.sum(), 1.0)
    return supcon + type_weight * ce, supcon, ce
