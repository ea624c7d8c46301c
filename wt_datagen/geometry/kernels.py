"""Numba kernels of the caster: pinhole ray generation, and the resolution of an engine's raw hit lists into
exact, sorted, de-duplicated layers.

Ray engines report candidate (ray, face) pairs: Open3D's ``list_intersections`` unsorted and sometimes twice for
one crossing at a shared edge (or once for a silhouette graze), embree one hit per call. These kernels decide
each candidate again, exactly, with a watertight ray/triangle test (Woop, Benthin & Wald, JCGT 2013) in float64
whose ties are broken by simulation of simplicity: the ray is displaced by an infinitesimal (d, d^2) in the
sheared image plane, so a ray through an edge or a vertex belongs to exactly the faces the displaced ray
crosses. Two faces sharing an edge compute that edge's function with the same operands in swapped order,
which in IEEE arithmetic is exactly its negation, tie-break included, so the displaced ray lies on one side
only: a crossing through an edge or vertex is counted once, a graze twice or not at all, and a closed mesh
always gets an even count. Faces an engine may have left out at such a point are added as candidates (the
faces around the vertices of a hit that lies within ``near`` of its triangle's border).
No tolerance on distance is involved, so two surfaces any distance apart both survive.
"""

from __future__ import annotations

import warnings

import numpy as np
from numba import njit, prange

RAY_CHUNK = 256  # rays per unit of parallel work

# numba probes TBB first and warns when the system's is too old; it then uses OpenMP or its own pool.
warnings.filterwarnings("ignore", message="The TBB threading layer")


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


@njit(cache=True, parallel=True)
def pinhole_rays(K, R, center, width, height, cam_dirs, world_dirs, rays32):
    """Rays through pixel centres, row-major: ``cam_dirs`` (N, 3) = K^-1 (u + .5, v + .5, 1) (z exactly 1),
    ``world_dirs`` (N, 3) = R^T cam_dirs, and ``rays32`` (N, 6) float32 (origin, direction) for the engine."""
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
                w = R[0, c] * x + R[1, c] * y + R[2, c]
                world_dirs[i, c] = w
                rays32[i, c] = center[c]
                rays32[i, 3 + c] = w


@njit(cache=True, parallel=True)
def count_candidates(splits, hit_geom, hit_prim, hit_uv, geom_face_offset, geom_faces, faces, vmerge, star_ptr, near,
                     counts):
    """counts[r] = number of candidate faces for ray r: its hits plus the vertex stars of near-border hits."""
    for r in prange(splits.shape[0] - 1):
        c = 0
        for j in range(splits[r], splits[r + 1]):
            c += 1
            u = hit_uv[j, 0]
            v = hit_uv[j, 1]
            if u < near or v < near or 1.0 - u - v < near:
                f = geom_faces[geom_face_offset[hit_geom[j]] + hit_prim[j]]
                for q in range(3):
                    m = vmerge[faces[f, q]]
                    c += star_ptr[m + 1] - star_ptr[m]
        counts[r] = c


@njit(cache=True, parallel=True)
def resolve_layers(
    splits, hit_geom, hit_prim, hit_uv, geom_face_offset, geom_faces, cand_ptr,
    tri, faces, vmerge, star_ptr, star_idx, face_inst, face_local, face_normal,
    origins, dirs, out_rot, near, num_layers,
    cand_f, cand_t, cand_u, cand_v, cand_front,
    depth, normal, front, face_id, inst_id, bary, num_hits,
):
    """Resolve every ray's candidates into the first ``num_layers`` exact crossings, sorted by distance.

    Inputs: ``splits`` (R+1) CSR over the engine's hits; per hit the engine's geometry and primitive ids (the
    global face is ``geom_faces[geom_face_offset[geom] + prim]``) and barycentrics (only used to find hits near a
    border);
    ``tri`` (F, 3, 3) float64 face corners in world units (the float32 geometry the engine holds), ``faces``
    (F, 3) global vertex ids; ``origins`` (1 or R, 3)
    and ``dirs`` (R, 3) world rays; the point at parameter t is o + t d. ``depth`` holds t (camera z for pixel
    rays K^-1 (u+.5, v+.5, 1) rotated to the world); normals are rotated by ``out_rot``. Output arrays are
    (K, R, ...); only valid slots are written, so the caller fills them first (0, and -1 for ids).
    ``cand_*`` are scratch buffers of size cand_ptr[-1].
    """
    R = splits.shape[0] - 1
    one_origin = origins.shape[0] == 1
    n_chunks = (R + RAY_CHUNK - 1) // RAY_CHUNK
    for chunk in prange(n_chunks):
        # prange gives each thread one contiguous run of iterations, and hits cluster in parts of an image:
        # visit chunks in a scattered order (chunk * prime mod n is a permutation) to balance the threads.
        cc = (chunk * 2654435761) % n_chunks
        for r in range(cc * RAY_CHUNK, min(R, (cc + 1) * RAY_CHUNK)):
            # Plain scalar indexing only: array views in a prange body cost an atomic refcount each.
            oi = 0 if one_origin else r
            if splits[r] == splits[r + 1]:
                num_hits[r] = 0
                continue
            base = cand_ptr[r]
            # Gather candidate faces.
            n = 0
            for j in range(splits[r], splits[r + 1]):
                f = geom_faces[geom_face_offset[hit_geom[j]] + hit_prim[j]]
                cand_f[base + n] = f
                n += 1
                u = hit_uv[j, 0]
                v = hit_uv[j, 1]
                if u < near or v < near or 1.0 - u - v < near:
                    for q in range(3):
                        m = vmerge[faces[f, q]]
                        for s in range(star_ptr[m], star_ptr[m + 1]):
                            cand_f[base + n] = star_idx[s]
                            n += 1
            # Sort face ids so that duplicates are adjacent (insertion sort: lists are short).
            for i in range(1, n):
                key = cand_f[base + i]
                k = i - 1
                while k >= 0 and cand_f[base + k] > key:
                    cand_f[base + k + 1] = cand_f[base + k]
                    k -= 1
                cand_f[base + k + 1] = key
            # Shear frame of the ray (Woop et al.): kz the dominant axis, winding kept.
            kz = 0
            if abs(dirs[r, 1]) > abs(dirs[r, kz]):
                kz = 1
            if abs(dirs[r, 2]) > abs(dirs[r, kz]):
                kz = 2
            kx = (kz + 1) % 3
            ky = (kx + 1) % 3
            if dirs[r, kz] < 0.0:
                kx, ky = ky, kx
            sx = dirs[r, kx] / dirs[r, kz]
            sy = dirs[r, ky] / dirs[r, kz]
            sz = 1.0 / dirs[r, kz]
            ox = origins[oi, kx]
            oy = origins[oi, ky]
            oz = origins[oi, kz]
            # Exact test of each distinct candidate; accepted hits are compacted to the front of the buffer.
            a = 0
            prev = -1
            for i in range(n):
                f = cand_f[base + i]
                if f == prev:
                    continue
                prev = f
                az = tri[f, 0, kz] - oz
                bz = tri[f, 1, kz] - oz
                cz = tri[f, 2, kz] - oz
                ax = (tri[f, 0, kx] - ox) - sx * az
                ay = (tri[f, 0, ky] - oy) - sy * az
                bx = (tri[f, 1, kx] - ox) - sx * bz
                by = (tri[f, 1, ky] - oy) - sy * bz
                cx = (tri[f, 2, kx] - ox) - sx * cz
                cy = (tri[f, 2, ky] - oy) - sy * cz
                su = _edge_sign(bx, by, cx, cy)
                sv = _edge_sign(cx, cy, ax, ay)
                sw = _edge_sign(ax, ay, bx, by)
                if su == 0 or su != sv or su != sw:
                    continue
                U = bx * cy - by * cx
                V = cx * ay - cy * ax
                W = ax * by - ay * bx
                det = U + V + W
                if det == 0.0:
                    continue
                t = sz * (U * az + V * bz + W * cz) / det
                if not t > 0.0:
                    continue
                cand_f[base + a] = f
                cand_t[base + a] = t
                cand_u[base + a] = V / det
                cand_v[base + a] = W / det
                cand_front[base + a] = det < 0.0  # det < 0 <=> the face normal points against the ray
                a += 1
            # Sort accepted hits by (float32 depth, exits before entries, face): crossings that coincide at the
            # stored precision (bodies touching face to face) leave one body before entering the next.
            for i in range(1, a):
                tf = cand_f[base + i]
                tt = cand_t[base + i]
                tu = cand_u[base + i]
                tv = cand_v[base + i]
                tb = cand_front[base + i]
                t32 = np.float32(tt)
                k = i - 1
                while k >= 0:
                    p32 = np.float32(cand_t[base + k])
                    pb = cand_front[base + k]
                    if not (p32 > t32 or (p32 == t32 and (pb > tb or (pb == tb and cand_f[base + k] > tf)))):
                        break
                    cand_f[base + k + 1] = cand_f[base + k]
                    cand_t[base + k + 1] = cand_t[base + k]
                    cand_u[base + k + 1] = cand_u[base + k]
                    cand_v[base + k + 1] = cand_v[base + k]
                    cand_front[base + k + 1] = cand_front[base + k]
                    k -= 1
                cand_f[base + k + 1] = tf
                cand_t[base + k + 1] = tt
                cand_u[base + k + 1] = tu
                cand_v[base + k + 1] = tv
                cand_front[base + k + 1] = tb
            num_hits[r] = a
            for k in range(min(a, num_layers)):
                f = cand_f[base + k]
                t = cand_t[base + k]
                depth[k, r] = t
                for c in range(3):
                    normal[k, r, c] = (out_rot[c, 0] * face_normal[f, 0] + out_rot[c, 1] * face_normal[f, 1]
                                       + out_rot[c, 2] * face_normal[f, 2])
                front[k, r] = cand_front[base + k]
                face_id[k, r] = face_local[f]
                inst_id[k, r] = face_inst[f]
                bary[k, r, 0] = cand_u[base + k]
                bary[k, r, 1] = cand_v[base + k]
