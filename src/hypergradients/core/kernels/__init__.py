"""Numerical kernels on ``dict[str, Tensor]`` trees, behind the method objects of :mod:`..solvers`.

:mod:`.symmetric` solves ``H p = v`` for a symmetric Hessian operator (CG, the Neumann series,
a dense solve, randomized Nyström); :mod:`.krylov` solves general non-symmetric systems from a
``matvec`` closure (GMRES, BiCGStab, CG on the normal equations).
"""
