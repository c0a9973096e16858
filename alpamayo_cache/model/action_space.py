"""Unicycle (acceleration, curvature) action space of Alpamayo-R1.

A future trajectory (64 poses in the ego frame at t0, 0.1 s apart) is turned into 64 normalised
(accel, curvature) controls and back. Going from poses to controls is a chain of small regularised
least-squares problems (Tikhonov smoothing on finite differences), each solved through its normal
equations with a Cholesky factorisation, in float32, as the released model does:

1. heading: smooth the unwrapped yaw of the future rotations, anchored at yaw 0 at t0;
2. speed: fit v so that trapezoidal integration of v*(cos, sin)(heading) reproduces the xy steps;
   v0 comes from the same fit over the 16 history poses;
3. acceleration: fit a to the speed differences;
4. curvature: fit kappa so that kappa * (v dt + a dt^2/2) matches the heading steps.

Units: metres, seconds, radians; accel in m/s^2, curvature in 1/m before normalisation.
"""

from __future__ import annotations

import dataclasses

import torch

from alpamayo_cache.config import ActionSpaceConfig

STATS = ("accel_mean", "accel_std", "curvature_mean", "curvature_std")


def effective_stats(cfg: ActionSpaceConfig) -> ActionSpaceConfig:
    """``cfg`` with the normalisation stats the model really uses: bf16-rounded values when the release
    rebuilds them in bf16 (``stats_dtype``), else as configured."""
    if cfg.stats_dtype != "bf16":
        return cfg
    rounded = {k: float(torch.tensor(getattr(cfg, k)).to(torch.bfloat16)) for k in STATS}
    return dataclasses.replace(cfg, **rounded)


def yaw_from_rotation(rot: torch.Tensor) -> torch.Tensor:
    """Yaw (rotation about z) of rotation matrices [..., 3, 3] -> [...]."""
    return torch.atan2(rot[..., 1, 0], rot[..., 0, 0])


def unwrap(angle: torch.Tensor) -> torch.Tensor:
    """Unwrap the last axis so consecutive differences lie in (-pi, pi]."""
    step = torch.diff(angle, dim=-1)
    step = torch.atan2(torch.sin(step), torch.cos(step))
    return torch.cat([angle[..., :1], angle[..., :1] + torch.cumsum(step, dim=-1)], dim=-1)


def smoothness_penalty(n: int, order: int, lam: float, dt: float, like: torch.Tensor) -> torch.Tensor:
    """lam / dt^(2 order) * D^T D for the order-th finite difference D over n unknowns."""
    eye = torch.eye(n, dtype=like.dtype, device=like.device)
    diff = torch.diff(eye, n=order, dim=0)  # [n - order, n]
    return (lam / dt ** (2 * order)) * diff.T @ diff


def _solve_spd(lhs: torch.Tensor, rhs: torch.Tensor, ridge_retry: bool = False) -> torch.Tensor:
    """Solve lhs x = rhs for symmetric positive definite lhs [..., n, n] via Cholesky."""
    chol, info = torch.linalg.cholesky_ex(lhs)
    if ridge_retry:
        # A fit with no terminal constraint can be singular (standing still): raise the ridge until
        # the factorisation succeeds, as the released solver does.
        bump = 1e-4
        while bool((info != 0).any()):
            eye = torch.eye(lhs.shape[-1], dtype=lhs.dtype, device=lhs.device)
            lhs = lhs + bump * eye
            bump *= 10
            chol, info = torch.linalg.cholesky_ex(lhs)
    elif bool((info != 0).any()):
        raise ValueError("trajectory fit is singular (non-finite or degenerate poses)")
    return torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)


def _trapezoid_design(heading: torch.Tensor) -> torch.Tensor:
    """Design matrix [..., 2n, n+1] mapping speeds v_0..v_n to 2/dt * (dx, dy) of each step.

    Step i is covered by rows 2i (x) and 2i+1 (y): v_i u_i + v_{i+1} u_{i+1}, u = (cos, sin)(heading).
    """
    *lead, n_plus_1 = heading.shape
    n = n_plus_1 - 1
    design = heading.new_zeros(*lead, 2 * n, n + 1)
    rows = torch.arange(n, device=heading.device)
    cos, sin = torch.cos(heading), torch.sin(heading)
    design[..., 2 * rows, rows] = cos[..., :-1]
    design[..., 2 * rows, rows + 1] = cos[..., 1:]
    design[..., 2 * rows + 1, rows] = sin[..., :-1]
    design[..., 2 * rows + 1, rows + 1] = sin[..., 1:]
    return design


class UnicycleActionSpace:
    """traj_to_action / action_to_traj with the released constants (see ActionSpaceConfig)."""

    def __init__(self, cfg: ActionSpaceConfig) -> None:
        self.cfg = effective_stats(cfg)

    # -- speed fits ----------------------------------------------------------------------------
    def _speed_fit(self, dxy: torch.Tensor, heading: torch.Tensor, v0: torch.Tensor | None) -> torch.Tensor:
        """Least-squares speeds [..., n+1] from steps dxy [..., n, 2] and headings [..., n+1]."""
        c = self.cfg
        n = dxy.shape[-2]
        design = _trapezoid_design(heading)
        target = (2.0 / c.dt * dxy).flatten(-2)  # [..., 2n]
        gram = design.transpose(-1, -2) @ design  # [..., n+1, n+1]
        rhs_full = (design.transpose(-1, -2) @ target.unsqueeze(-1)).squeeze(-1)
        smooth = smoothness_penalty(n + 1, 3, c.v_lambda, c.dt, dxy)
        if v0 is None:
            lhs = gram + smooth + c.v_ridge * torch.eye(n + 1, dtype=dxy.dtype, device=dxy.device)
            return _solve_spd(lhs, rhs_full)
        # v_0 is known: move its column to the right-hand side and solve for v_1..v_n.
        rhs = rhs_full[..., 1:] - gram[..., 1:, 0] * v0.unsqueeze(-1) - smooth[1:, 0] * v0.unsqueeze(-1)
        lhs = (
            gram[..., 1:, 1:] + smooth[1:, 1:] + c.v_ridge * torch.eye(n, dtype=dxy.dtype, device=dxy.device)
        )
        return torch.cat([v0.unsqueeze(-1), _solve_spd(lhs, rhs)], dim=-1)

    def estimate_t0_speed(self, hist_xyz: torch.Tensor, hist_rot: torch.Tensor) -> torch.Tensor:
        """Speed at t0 [...] (m/s) from history poses [..., t, 3] and [..., t, 3, 3]."""
        dxy = torch.diff(hist_xyz[..., :2], dim=-2)
        heading = unwrap(yaw_from_rotation(hist_rot))
        return self._speed_fit(dxy, heading, v0=None)[..., -1]

    # -- generic "x * s = y" fit with 2nd-order smoothing --------------------------------------
    def _scaled_fit(
        self, slope: torch.Tensor, target: torch.Tensor, lam: float, ridge: float
    ) -> torch.Tensor:
        n = target.shape[-1]
        lhs = torch.diag_embed(slope * slope) + smoothness_penalty(n, 2, lam, self.cfg.dt, target)
        lhs = lhs + ridge * torch.eye(n, dtype=target.dtype, device=target.device)
        return _solve_spd(lhs, slope * target, ridge_retry=True)

    def _smooth_heading(self, fut_rot: torch.Tensor) -> torch.Tensor:
        """Smoothed headings [..., w+1], the first being 0 (the ego heading at t0)."""
        c = self.cfg
        target = unwrap(yaw_from_rotation(fut_rot))  # [..., w]
        n = target.shape[-1]
        smooth = smoothness_penalty(n + 1, 3, c.theta_lambda, c.dt, target)
        # Anchor heading_0 = 0: its column of the penalty drops out of the right-hand side.
        lhs = torch.eye(n, dtype=target.dtype, device=target.device) * (1.0 + c.theta_ridge) + smooth[1:, 1:]
        solved = _solve_spd(lhs, target)
        return torch.cat([torch.zeros_like(solved[..., :1]), solved], dim=-1)

    # -- public API ----------------------------------------------------------------------------
    @torch.no_grad()
    def traj_to_action(
        self,
        hist_xyz: torch.Tensor,
        hist_rot: torch.Tensor,
        fut_xyz: torch.Tensor,
        fut_rot: torch.Tensor,
    ) -> torch.Tensor:
        """Normalised controls [..., w, 2] (accel, curvature) for a future trajectory."""
        c = self.cfg
        if fut_xyz.shape[-2] != c.n_waypoints:
            raise ValueError(f"future trajectory has {fut_xyz.shape[-2]} waypoints, expected {c.n_waypoints}")
        v0 = self.estimate_t0_speed(hist_xyz, hist_rot)
        xy = torch.cat([hist_xyz[..., -1:, :2], fut_xyz[..., :2]], dim=-2)
        dxy = torch.diff(xy, dim=-2)  # [..., w, 2]
        heading = self._smooth_heading(fut_rot)  # [..., w+1]
        speed = self._speed_fit(dxy, heading, v0=v0)  # [..., w+1]
        dv = torch.diff(speed, dim=-1) / c.dt
        accel = self._scaled_fit(torch.ones_like(dv), dv, c.a_lambda, c.a_ridge)
        arc = c.dt * speed[..., :-1] + 0.5 * c.dt**2 * accel  # distance travelled per step
        curvature = self._scaled_fit(arc, torch.diff(heading, dim=-1), c.kappa_lambda, c.kappa_ridge)
        if c.clamp_target_curvature:  # 2 Super's targets: clamp, then no curvature when (nearly) stopped
            curvature = curvature.clamp(min=c.curvature_bounds[0], max=c.curvature_bounds[1])
        if c.target_low_speed_mps > 0:
            slow = (speed[..., :-1].abs() < c.target_low_speed_mps) | (
                speed[..., 1:].abs() < c.target_low_speed_mps
            )
            curvature = torch.where(slow, torch.zeros_like(curvature), curvature)
        accel = (accel - c.accel_mean) / c.accel_std
        curvature = (curvature - c.curvature_mean) / c.curvature_std
        return torch.stack([accel, curvature], dim=-1)

    def action_to_traj(
        self, action: torch.Tensor, hist_xyz: torch.Tensor, hist_rot: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Integrate normalised controls [..., w, 2] into poses: xyz [..., w, 3], rot [..., w, 3, 3]."""
        c = self.cfg
        accel = action[..., 0] * c.accel_std + c.accel_mean
        curvature = action[..., 1] * c.curvature_std + c.curvature_mean
        v0 = self.estimate_t0_speed(hist_xyz.float(), hist_rot.float()).to(accel.dtype)
        speed = torch.cat([v0.unsqueeze(-1), v0.unsqueeze(-1) + torch.cumsum(accel * c.dt, dim=-1)], dim=-1)
        # heading_{k+1} = heading_k + kappa_k (v_k dt + a_k dt^2 / 2)
        turn = curvature * speed[..., :-1] * c.dt + curvature * accel * (0.5 * c.dt**2)
        heading = torch.cat([torch.zeros_like(v0).unsqueeze(-1), torch.cumsum(turn, dim=-1)], dim=-1)
        # Trapezoidal position update.
        half = 0.5 * c.dt
        x = torch.cumsum(speed[..., :-1] * torch.cos(heading[..., :-1]) * half, dim=-1) + torch.cumsum(
            speed[..., 1:] * torch.cos(heading[..., 1:]) * half, dim=-1
        )
        y = torch.cumsum(speed[..., :-1] * torch.sin(heading[..., :-1]) * half, dim=-1) + torch.cumsum(
            speed[..., 1:] * torch.sin(heading[..., 1:]) * half, dim=-1
        )
        z = hist_xyz[..., -1:, 2].to(x.dtype).expand_as(x)
        xyz = torch.stack([x, y, z], dim=-1)
        return xyz, yaw_to_rotation(heading[..., 1:])


def yaw_to_rotation(yaw: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [..., 3, 3] about z for yaw [...] (flat ground)."""
    cos, sin = torch.cos(yaw), torch.sin(yaw)
    zero, one = torch.zeros_like(yaw), torch.ones_like(yaw)
    return torch.stack(
        [
            torch.stack([cos, -sin, zero], dim=-1),
            torch.stack([sin, cos, zero], dim=-1),
            torch.stack([zero, zero, one], dim=-1),
        ],
        dim=-2,
    )
