"""Realistic vehicle data for benchmarks and the fleet: a drive along a route, sampled at 1 Hz."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Drive:
    """A vehicle's state between samples; ``step`` advances one second."""

    rng: random.Random
    lat: float = 52.52
    lon: float = 13.405
    heading: float = 90.0
    speed_kmh: float = 50.0
    battery_pct: float = 90.0
    motor_c: float = 40.0
    cabin_c: float = 21.0
    odometer_km: float = 12_000.0
    t: int = 0
    history: list[float] = field(default_factory=list)

    def step(self) -> dict[str, Any]:
        """One GPS fix with speed, heading, battery and temperatures (about 200 bytes as JSON)."""
        r = self.rng
        self.t += 1
        self.heading = (self.heading + r.gauss(0, 4)) % 360
        self.speed_kmh = min(130.0, max(0.0, self.speed_kmh + r.gauss(0, 2.5)))
        dist_km = self.speed_kmh / 3600
        self.lat += dist_km / 111.0 * math.cos(math.radians(self.heading))
        self.lon += dist_km / 68.0 * math.sin(math.radians(self.heading))
        self.battery_pct = max(0.0, self.battery_pct - 0.002 - self.speed_kmh * 0.00005)
        self.motor_c += (35 + self.speed_kmh * 0.4 - self.motor_c) * 0.05 + r.gauss(0, 0.2)
        self.cabin_c += r.gauss(0, 0.05)
        self.odometer_km += dist_km
        return {
            "lat": round(self.lat, 6),
            "lon": round(self.lon, 6),
            "alt_m": round(34 + r.gauss(0, 0.5), 1),
            "speed_kmh": round(self.speed_kmh, 1),
            "heading_deg": round(self.heading, 1),
            "battery_pct": round(self.battery_pct, 2),
            "motor_temp_c": round(self.motor_c, 1),
            "cabin_temp_c": round(self.cabin_c, 1),
            "odometer_km": round(self.odometer_km, 3),
            "hdop": round(0.8 + abs(r.gauss(0, 0.2)), 2),
            "sats": r.randint(7, 12),
        }
