"""single-profile-handler: run the one profile once; its result is the answer."""

from __future__ import annotations

from infergw.epp.errors import PickerError
from infergw.epp.scheduling.framework import ProfileHandler, SchedulingResult


class SingleProfileHandler(ProfileHandler):
    type_name = "single-profile-handler"

    def pick_profiles(self, ctx, profiles, done):
        if done:
            return []
        if len(profiles) != 1:
            raise PickerError(
                500, f"single-profile-handler needs exactly one profile, got {len(profiles)}"
            )
        return list(profiles.values())

    def process_results(self, ctx, done):
        name, result = next(iter(done.items()))
        if result is None or not result.targets:
            raise PickerError(429, "no endpoint left after filtering")
        return SchedulingResult({name: result}, name)
