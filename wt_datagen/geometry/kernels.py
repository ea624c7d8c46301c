"""Numba kernels of the caster: pinhole ray generation, and the exact decision, in float64, of every
candidate (ray, face) an engine proposes.

An engine (``embree_engine.Scene``: every hit of Embree's watertight float32 test in one traversal) proposes
candidate faces per ray. Three kernels then decide, on the very ray the engine traced (its float32 origin and
direction, read as float64) and on the engine's own float32 vertices (read as float64):

1. ``mark_candidates``: which proposals lie so close to their triangle's border that the engine's float32
   arithmetic may have put the ray on the wrong side of an edge (the one near-border rule, ``_near_border``);
   the faces around those corners (vertex stars) become candidates too, since the face the ray really
   crosses there shares the corner. A ray running along a chain of edges (exactly along an edge of an
   axis-aligned part, say) is resolved again with all its candidates as proposals, until no candidate is
   near its border at a corner whose faces are not in yet.
2. ``resolve_crossings``: each distinct candidate is tested exactly with a watertight ray/triangle test
   (Woop, Benthin & Wald, JCGT 2013) whose ties are broken by simulation of simplicity: the ray is displaced
   by an infinitesimal (d, d^2) in the sheared image plane, so a ray through an edge or a vertex belongs to
   exactly the faces the displaced ray crosses. Two faces sharing an edge compute that edge's function with
   the same operands in swapped order, which in IEEE arithmetic is exactly its negation, tie-break included,
   so the displaced ray lies on one side only: a crossing through an edge or vertex is counted once, a graze
   twice or not at all, and a closed mesh always gets an even count. No tolerance on distance is involved, so
   two surfaces any distance apart both survive.
3. ``order_layers``: the crossings a per-crossing keep mask leaves (all, without one) are ordered by the one
   rule that decides "the same crossing" (``_before``: float32 depth, then exits before entries, then face),
   counted, and the first K written out.
"""

from __future__ import annotations

import warnings

import numba
import numpy as np
from numba import njit, prange

RAY_CHUNK = 256  # rays per unit of parallel work
SHORT_LIST = 24  # candidate lists up to this length are sorted by insertion, longer ones by quicksort

# numba probes TBB first and warns when the system's is too old; it then uses OpenMP or its own pool.
warnings.filterwarnings("ignore", message="The TBB threading layer")
# Embree runs its own TBB pool; numba's TBB layer would then hang at interpreter exit (its tbb::finalize waits
# for Embree's workers). So numba uses OpenMP unless NUMBA_THREADING_LAYER says otherwise.
if numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "omp"


@njit(cache=True, inline="always")
def _edge_sign(px: float, py: float, qx: float, qy: float) -> int:
    """Sign of cross(p - x, q - x) for the ray's point x = (d, d^2), d -> 0+ (simulation of simplicity)."""
    e = px * qy - py * qx
    if e > 0.0:
        return 1
    if e < 0.0:
        return -1
    if py != qy:  # first-order term d * (py - qy)
        return 1 if py > qy else -1
    if qx != px:  # second-order term d^2 * (qx - px)
        return 1 if qx > px else -1
    return 0


@njit(cache=True, inline="always")
def _ray_frame(rays32, r):
    """Shear frame of ray r of ``rays32`` (R, 6) float32 (origin, direction), read as float64 (Woop et al.):
    kz the dominant axis, winding kept. Returns (kx, ky, kz, sx, sy, sz, ox, oy, oz)."""
    kz = 0
    if abs(rays32[r, 4]) > abs(rays32[r, 3 + kz]):
        kz = 1
    if abs(rays32[r, 5]) > abs(rays32[r, 3 + kz]):
        kz = 2
    kx = (kz + 1) % 3
    ky = (kx + 1) % 3
    dz = np.float64(rays32[r, 3 + kz])
    if dz < 0.0:
        kx, ky = ky, kx
    sx = np.float64(rays32[r, 3 + kx]) / dz
    sy = np.float64(rays32[r, 3 + ky]) / dz
    return (kx, ky, kz, sx, sy, 1.0 / dz,
            np.float64(rays32[r, kx]), np.float64(rays32[r, ky]), np.float64(rays32[r, kz]))


@njit(cache=True, inline="always")
def _sheared(tri, f, kx, ky, kz, sx, sy, ox, oy, oz):
    """Face f's corners relative to the ray origin in its shear frame: (ax, ay, az, bx, by, bz, cx, cy, cz)."""
    az = tri[f, 0, kz] - oz
    bz = tri[f, 1, kz] - oz
    cz = tri[f, 2, kz] - oz
    return ((tri[f, 0, kx] - ox) - sx * az, (tri[f, 0, ky] - oy) - sy * az, az,
            (tri[f, 1, kx] - ox) - sx * bz, (tri[f, 1, ky] - oy) - sy * bz, bz,
            (tri[f, 2, kx] - ox) - sx * cz, (tri[f, 2, ky] - oy) - sy * cz, cz)


@njit(cache=True, inline="always")
def _segment_near(px, py, qx, qy, d2) -> int:
    """Whether the segment p q of the shear plane passes within sqrt(d2) of the ray (its origin): 0 if not,
    else 1 when its closest point is nearer p, 2 when nearer q."""
    ex = qx - px
    ey = qy - py
    ee = ex * ex + ey * ey
    t = 0.0
    if ee > 0.0:
        t = min(1.0, max(0.0, -(px * ex + py * ey) / ee))
    x = px + t * ex
    y = py + t * ey
    if x * x + y * y > d2:
        return 0
    return 1 if t < 0.5 else 2


@njit(cache=True, inline="always")
def _near_border(tri, f, kx, ky, kz, sx, sy, ox, oy, oz, margin) -> int:
    """THE near-border rule: a mask of corners of face f (bits 1, 2, 4) whose vertex stars must be candidates,
    because an edge there passes within ``delta`` of the ray in its shear plane. The engine's float32 test
    works on the corners relative to the ray origin, whose coordinates are at most ``L`` in magnitude; its
    rounding (and the tilt of ``embree_engine``'s extra traces) moves each corner by ``delta = margin * L`` at most
    (margin a few float32 ulps), so it can put the ray on the other side of the triangle's border only where
    an edge passes that close. Relative, so it holds at any scale and any distance from the origin. The face
    the ray crosses there instead shares the edge, or the vertex, nearest the ray: of each such edge, the
    corner nearer the ray's closest approach is returned (its star holds the face across the edge, and every
    face around that corner)."""
    ax, ay, az, bx, by, bz, cx, cy, cz = _sheared(tri, f, kx, ky, kz, sx, sy, ox, oy, oz)
    L = max(abs(az), abs(bz), abs(cz))
    for i in range(3):
        L = max(L, abs(tri[f, i, kx] - ox), abs(tri[f, i, ky] - oy))
    d2 = (margin * L) ** 2
    mask = 0
    e = _segment_near(bx, by, cx, cy, d2)  # edge 1-2
    if e:
        mask |= 2 if e == 1 else 4
    e = _segment_near(cx, cy, ax, ay, d2)  # edge 2-0
    if e:
        mask |= 4 if e == 1 else 1
    e = _segment_near(ax, ay, bx, by, d2)  # edge 0-1
    if e:
        mask |= 1 if e == 1 else 2
    return mask


@njit(cache=True, inline="always")
def _crossing(tri, f, kx, ky, kz, sx, sy, sz, ox, oy, oz):
    """Exact test of face f: (crossed, t, u, v, front). front: the face normal points against the ray."""
    ax, ay, az, bx, by, bz, cx, cy, cz = _sheared(tri, f, kx, ky, kz, sx, sy, ox, oy, oz)
    su = _edge_sign(bx, by, cx, cy)
    sv = _edge_sign(cx, cy, ax, ay)
    sw = _edge_sign(ax, ay, bx, by)
    if su == 0 or su != sv or su != sw:
        return False, 0.0, 0.0, 0.0, False
    U = bx * cy - by * cx
    V = cx * ay - cy * ax
    W = ax * by - ay * bx
    det = U + V + W
    if det == 0.0:
        return False, 0.0, 0.0, 0.0, False
    t = sz * (U * az + V * bz + W * cz) / det
    if not t > 0.0:
        return False, 0.0, 0.0, 0.0, False
    return True, t, V / det, W / det, det < 0.0


@njit(cache=True, inline="always")
def _before(ta, fronta, fa, tb, frontb, fb) -> bool:
    """THE order of crossings along a ray, and so the rule for "the same crossing": by float32 depth; at
    equal float32 depth (bodies touching face to face) exits before entries, so the ray leaves one body
    before it enters the next; then by face."""
    a32 = np.float32(ta)
    b32 = np.float32(tb)
    if a32 != b32:
        return a32 < b32
    if fronta != frontb:
        return frontb
    return fa < fb


@njit(cache=True, parallel=True)
def pinhole_rays(K, R, center, width, height, cam_dirs, rays32):
    """Rays through pixel centres, row-major: ``cam_dirs`` (N, 3) = K^-1 (u + .5, v + .5, 1) (z exactly 1) and
    ``rays32`` (N, 6) float32 (origin ``center``, direction R^T cam_dirs) for the engine."""
    fx, s, cx = K[0, 0], K[0, 1], K[0, 2]
    fy, cy = K[1, 1], K[1, 2]
    for v in prange(height):
        y = (v + 0.5 - cy) / fy
        for u in range(width):
            i = v * width + u
            x = (u + 0.5 - cx - s * y) / fx
            cam_dirs[i, 0] = x
            cam_dirs[i, 1] = y
            cam_dirs[i, 2] = 1.0
            for c in range(3):
                rays32[i, c] = center[c]
                rays32[i, 3 + c] = R[0, c] * x + R[1, c] * y + R[2, c]


@njit(cache=True, parallel=True)
def mark_candidates(off, cnt, cand, rays32, tri, faces, vmerge, star_ptr, margin, near, counts):
    """For the proposed candidates of rays i < len(cnt) (ray i is ``rays32[i]``, its faces ``cand[off[i]:off[i] +
    cnt[i]]``): ``near[j]`` the corners of candidate j near which the ray may cross another face
    (``_near_border``), and ``counts[i]`` the number of candidates ray i will gather: its own and the faces
    around those corners (vertex stars)."""
    for i in prange(cnt.shape[0]):
        c = cnt[i]
        if c:
            kx, ky, kz, sx, sy, sz, ox, oy, oz = _ray_frame(rays32, i)
            for j in range(off[i], off[i] + cnt[i]):
                f = cand[j]
                near[j] = _near_border(tri, f, kx, ky, kz, sx, sy, ox, oy, oz, margin)
                for q in range(3):
                    if near[j] >> q & 1:
                        m = vmerge[faces[f, q]]
                        c += star_ptr[m + 1] - star_ptr[m]
        counts[i] = c


@njit(cache=True, inline="always")
def _sort_unique(a, start, n) -> int:
    """Sort a[start:start + n] in place and move its distinct values to the front; returns their number."""
    if n <= SHORT_LIST:
        for i in range(start + 1, start + n):
            key = a[i]
            k = i - 1
            while k >= start and a[k] > key:
                a[k + 1] = a[k]
                k -= 1
            a[k + 1] = key
    else:
        a[start:start + n].sort()
    u = 0
    for i in range(start, start + n):
        if u == 0 or a[i] != a[start + u - 1]:
            a[start + u] = a[i]
            u += 1
    return u


@njit(cache=True, inline="always")
def _new_corner(mask, f, faces, vmerge, corners, start, n) -> bool:
    """Whether a corner in ``mask`` of face f is none of the (merged) vertices ``corners[start:start + n]``
    (sorted): the corners whose stars are already candidates."""
    for q in range(3):
        if mask >> q & 1:
            m = vmerge[faces[f, q]]
            lo = start
            hi = start + n
            while lo < hi:
                mid = (lo + hi) // 2
                if corners[mid] < m:
                    lo = mid + 1
                else:
                    hi = mid
            if lo == start + n or corners[lo] != m:
                return True
    return False


@njit(cache=True, parallel=True)
def resolve_crossings(i0, i1, off, cnt, cand, near, ptr, rays32, tri, faces, vmerge, star_ptr, star_idx, margin,
                      corners, res_c, res_f, res_t, res_u, res_v, res_front, res_nc, res_n, again):
    """Exact crossings of rays i in [i0, i1) (``rays32[i]``). Ray i's candidates, its proposals and the vertex
    stars of those ``near`` their border, are gathered, de-duplicated, at ``ptr[i] - ptr[i0]`` of ``res_c``
    (``res_nc[i]`` of them, proposals first) and tested (``_crossing``); the ``res_n[i]`` crossed ones are
    written from the same place of ``res_f, res_t, res_u, res_v, res_front`` in no particular order: global
    face, float64 t (point = o + t d on the float32 ray), barycentrics, front. ``again[i]``: a face the stars
    brought in is near its border at a corner whose star is not in yet, so faces around that corner may be
    crossed too (the ray runs along a chain of edges): the caller resolves the ray once more with all of
    ``res_c`` as proposals. ``corners`` is scratch of 3 entries per proposal."""
    n_chunks = (i1 - i0 + RAY_CHUNK - 1) // RAY_CHUNK
    for chunk in prange(n_chunks):
        # prange gives each thread one contiguous run of iterations, and hits cluster in parts of an image:
        # visit chunks in a scattered order (chunk * prime mod n is a permutation) to balance the threads.
        cc = (chunk * 2654435761) % n_chunks
        for i in range(i0 + cc * RAY_CHUNK, min(i1, i0 + (cc + 1) * RAY_CHUNK)):
            # Plain scalar indexing only: array views in a prange body cost an atomic refcount each.
            again[i] = False
            if cnt[i] == 0:
                res_nc[i] = 0
                res_n[i] = 0
                continue
            base = ptr[i] - ptr[i0]
            n = 0
            for j in range(off[i], off[i] + cnt[i]):
                res_c[base + n] = cand[j]
                n += 1
            p = _sort_unique(res_c, base, n)
            n = p
            nco = 0  # the merged vertices whose stars come in, from 3 * off[i] of corners
            for j in range(off[i], off[i] + cnt[i]):
                for q in range(3):
                    if near[j] >> q & 1:
                        m = vmerge[faces[cand[j], q]]
                        corners[3 * off[i] + nco] = m
                        nco += 1
                        for k in range(star_ptr[m], star_ptr[m + 1]):
                            res_c[base + n] = star_idx[k]
                            n += 1
            nco = _sort_unique(corners, 3 * off[i], nco)
            # The stars' faces that are not proposals follow the proposals (both lists sorted).
            s = _sort_unique(res_c, base + p, n - p)
            n = p
            a = 0
            for k in range(base + p, base + p + s):
                f = res_c[k]
                while a < p and res_c[base + a] < f:
                    a += 1
                if a < p and res_c[base + a] == f:
                    continue
                res_c[base + n] = f
                n += 1
            res_nc[i] = n
            kx, ky, kz, sx, sy, sz, ox, oy, oz = _ray_frame(rays32, i)
            acc = 0
            for k in range(n):
                f = res_c[base + k]
                hit, t, u, v, front = _crossing(tri, f, kx, ky, kz, sx, sy, sz, ox, oy, oz)
                if hit:
                    res_f[base + acc] = f
                    res_t[base + acc] = t
                    res_u[base + acc] = u
                    res_v[base + acc] = v
                    res_front[base + acc] = front
                    acc += 1
                if k >= p and not again[i]:
                    again[i] = _new_corner(_near_border(tri, f, kx, ky, kz, sx, sy, ox, oy, oz, margin), f, faces,
                                           vmerge, corners, 3 * off[i], nco)
            res_n[i] = acc


@njit(cache=True, parallel=True)
def order_layers(i0, i1, ptr, res_n, res_f, res_t, res_u, res_v, res_front, keep, out_ray, face_inst, face_local,
                 face_normal, out_rot, num_layers, depth, normal, front, face_id, inst_id, bary, num_hits):
    """The first ``num_layers`` crossings of rays i in [i0, i1), in the order of ``_before``, written to the
    (K, R, ...) outputs at ray ``out_ray[i]``; ``num_hits`` counts them all. Crossings whose ``keep`` entry is
    False are no surface (``keep`` has the layout of ``res_*``, or length 0 to keep everything). Normals are
    rotated by ``out_rot``. Only valid slots are written, so the caller fills the outputs first (0, and -1 for
    ids). The ``res_*`` arrays are reordered in place."""
    K = num_layers
    use_keep = keep.shape[0] > 0
    n_chunks = (i1 - i0 + RAY_CHUNK - 1) // RAY_CHUNK
    for chunk in prange(n_chunks):
        cc = (chunk * 2654435761) % n_chunks
        for i in range(i0 + cc * RAY_CHUNK, min(i1, i0 + (cc + 1) * RAY_CHUNK)):
            base = ptr[i] - ptr[i0]
            m = 0  # the sorted first crossings, at most K, are held at res_*[base:base + m]
            kept = 0
            for j in range(res_n[i]):
                if use_keep and not keep[base + j]:
                    continue
                kept += 1
                tf = res_f[base + j]
                tt = res_t[base + j]
                tu = res_u[base + j]
                tv = res_v[base + j]
                tb = res_front[base + j]
                if m == K and not _before(tt, tb, tf, res_t[base + K - 1], res_front[base + K - 1],
                                          res_f[base + K - 1]):
                    continue
                k = K - 2 if m == K else m - 1
                while k >= 0 and _before(tt, tb, tf, res_t[base + k], res_front[base + k], res_f[base + k]):
                    res_f[base + k + 1] = res_f[base + k]
                    res_t[base + k + 1] = res_t[base + k]
                    res_u[base + k + 1] = res_u[base + k]
                    res_v[base + k + 1] = res_v[base + k]
                    res_front[base + k + 1] = res_front[base + k]
                    k -= 1
                res_f[base + k + 1] = tf
                res_t[base + k + 1] = tt
                res_u[base + k + 1] = tu
                res_v[base + k + 1] = tv
                res_front[base + k + 1] = tb
                m = min(m + 1, K)
            r = out_ray[i]
            num_hits[r] = kept
            for k in range(m):
                f = res_f[base + k]
                depth[k, r] = res_t[base + k]
                for c in range(3):
                    normal[k, r, c] = (out_rot[c, 0] * face_normal[f, 0] + out_rot[c, 1] * face_normal[f, 1]
                                       + out_rot[c, 2] * face_normal[f, 2])
                front[k, r] = res_front[base + k]
                face_id[k, r] = face_local[f]
                inst_id[k, r] = face_inst[f]
                bary[k, r, 0] = res_u[base + k]
                bary[k, r, 1] = res_v[base + k]
