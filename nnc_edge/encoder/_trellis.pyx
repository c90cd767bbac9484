# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# distutils: extra_compile_args = -ffp-contract=off
"""Compiled twin of nnc_edge.encoder.quantize._trellis_python: the 8-state dependent-quantization trellis.

Same arithmetic in the same order (double precision, no fused multiply-add, ties keep the first
branch), so both give identical levels; nnc_edge.encoder.quantize documents the algorithm (supplement 5.2)
and the optional rate term.
"""

from libc.float cimport DBL_MAX
from libc.math cimport INFINITY, log2

# Branches into state c as (previous state, slot), index 3 * c + b: slot (multiple & 3) of the four
# candidates, 4 = zero. The same table, in the same order, as quantize._BRANCHES (a test checks it).
cdef int BR_PREV[24]
cdef int BR_SLOT[24]
BR_PREV[:] = [0, 0, 4, 2, 2, 6, 0, 4, 4, 2, 6, 6, 3, 7, 7, 1, 5, 5, 3, 3, 7, 1, 1, 5]
BR_SLOT[:] = [0, 4, 2, 0, 4, 2, 2, 0, 4, 2, 0, 4, 1, 3, 4, 1, 3, 4, 3, 4, 1, 3, 4, 1]


def branches():
    """The branch table compiled in, for the consistency check in the tests."""
    return tuple(tuple((BR_PREV[3 * c + b], BR_SLOT[3 * c + b]) for b in range(3)) for c in range(8))


cdef inline long long first_candidate(double o, long long lim) noexcept nogil:
    cdef long long m0 = <long long>o - 1
    if m0 > lim - 3:
        m0 = lim - 3
    if m0 < 1:
        m0 = 1
    return m0


cdef inline double magnitude_bits(const double[::1] mag, Py_ssize_t size, int neg, long long a) noexcept nogil:
    if a < size:
        return mag[neg * size + a]
    return mag[neg * size + size - 1] + 2.0 * log2(<double>a / <double>(size - 1))


def dq_trellis(const double[::1] values, const unsigned char[::1] skip, const int[::1] skip_perm,
               long long lim_pos, long long lim_neg, int[::1] out, unsigned short[::1] decisions,
               unsigned char[::1] states, double lam, const double[::1] sig_bits,
               const double[::1] sign_bits, const double[::1] mag_bits):
    """Fill ``out`` with n and ``states`` with the state before each item; ``decisions`` is scratch
    space of the same length. With ``lam`` > 0 the cost of a branch adds lam times its estimated bits:
    sig_bits[2 * (3 * state + nbClass) + sig], sign_bits[2 * nbClass + negative] and
    mag_bits[negative * size + |k|] (size = len(mag_bits) // 2)."""
    cdef Py_ssize_t count = values.shape[0]
    cdef Py_ssize_t mag_size = mag_bits.shape[0] // 2
    cdef Py_ssize_t i
    cdef int c, b, s, prev, slot, state, neg, choice, ctx
    cdef double cost[8]
    cdef double new[8]
    cdef double dist[5]
    cdef double mag[4]
    cdef int nbc[8]
    cdef int new_nbc[8]
    cdef int inverse[8]
    cdef double v, o, d, x, best, rate
    cdef long long lim, m0, q
    cdef unsigned int packed
    if (skip.shape[0] != count or out.shape[0] != count or decisions.shape[0] != count
            or states.shape[0] != count or skip_perm.shape[0] != 8):
        raise ValueError("dq_trellis: array lengths do not match")
    if lam != 0 and (sig_bits.shape[0] != 48 or sign_bits.shape[0] != 6 or mag_size < 2):
        raise ValueError("dq_trellis: rate tables have the wrong size")
    for s in range(8):
        inverse[skip_perm[s]] = s
    with nogil:
        cost[0] = 0.0
        for s in range(8):
            nbc[s] = 0
            if s:
                cost[s] = 0.5 * DBL_MAX
        for i in range(count):
            if skip[i]:
                # 6.5: the states move by skip_perm; nb is unchanged
                for c in range(8):
                    new[c] = cost[inverse[c]]
                    new_nbc[c] = nbc[inverse[c]]
                for c in range(8):
                    cost[c] = new[c]
                    nbc[c] = new_nbc[c]
                decisions[i] = 0
                continue
            v = values[i]
            neg = v < 0
            if neg:
                o = -v
                lim = lim_neg
            else:
                o = v
                lim = lim_pos
            m0 = first_candidate(o, lim)
            dist[4] = o * o
            for q in range(m0, m0 + 4):
                if q <= lim:
                    d = o - <double>q
                    dist[q & 3] = d * d
                else:
                    dist[q & 3] = INFINITY
                if lam != 0:
                    mag[q & 3] = magnitude_bits(mag_bits, mag_size, neg, (q + 1) >> 1)
            packed = 0
            for c in range(8):
                best = DBL_MAX
                choice = 0
                for b in range(3):
                    prev = BR_PREV[3 * c + b]
                    slot = BR_SLOT[3 * c + b]
                    x = cost[prev] + dist[slot]
                    if lam != 0:
                        ctx = 2 * (3 * prev + nbc[prev])
                        if slot == 4:
                            rate = sig_bits[ctx]
                        else:
                            rate = sig_bits[ctx + 1] + sign_bits[2 * nbc[prev] + neg] + mag[slot]
                        x = x + lam * rate
                    if x < best:
                        best = x
                        choice = b
                new[c] = best
                slot = BR_SLOT[3 * c + choice]
                new_nbc[c] = 0 if slot == 4 else (1 if neg else 2)
                packed |= <unsigned int>choice << (2 * c)
            for c in range(8):
                cost[c] = new[c]
                nbc[c] = new_nbc[c]
            decisions[i] = <unsigned short>packed
        state = 0
        for c in range(1, 8):
            if cost[c] < cost[state]:
                state = c
        for i in range(count - 1, -1, -1):
            if skip[i]:
                out[i] = 0
                state = inverse[state]
                states[i] = state
                continue
            b = (decisions[i] >> (2 * state)) & 3
            prev = BR_PREV[3 * state + b]
            slot = BR_SLOT[3 * state + b]
            if slot == 4:
                out[i] = 0
            else:
                v = values[i]
                if v < 0:
                    o = -v
                    lim = lim_neg
                else:
                    o = v
                    lim = lim_pos
                m0 = first_candidate(o, lim)
                q = m0 + ((slot - m0) & 3)
                out[i] = <int>(-q if v < 0 else q)
            state = prev
            states[i] = state
