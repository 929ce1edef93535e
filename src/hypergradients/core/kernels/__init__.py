"""Numerical kernels on ``dict[str, Tensor]`` trees, behind the method objects of :mod:`..solvers`.

One signature for all: ``kernel(op, v, *, x0=..., options) -> Solve``, with ``op`` a
:class:`~hypergradients.LinearOperator` (``op(x) = Mx``; damping is ``op.damped(δ)``, not a kernel
option), ``v`` the right-hand side of ``M p = v``, and the :class:`~.solve.Solve` holding ``p`` and
what the solve found. The operator counts the products; a kernel does not.

* :mod:`.krylov` — Krylov-subspace methods: :func:`~.krylov.cg` and :func:`~.krylov.minres` for a
  symmetric ``M`` (positive definite, indefinite), :func:`~.krylov.gmres`,
  :func:`~.krylov.bicgstab` and :func:`~.krylov.cgls` for any non-singular one;
* :mod:`.series` — the Neumann series and its one-term case, the identity; power iteration;
* :mod:`.dense` — the dense matrix from products and a direct solve;
* :mod:`.nystrom` — randomized Nyström approximations of a symmetric positive semi-definite ``M``.
"""
