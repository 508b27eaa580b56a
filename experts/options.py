"""Option types shared by the families (compressors, merge methods): each field declared once, with its
bounds and description; each member states its own default where it uses one."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StrictBool

Density = Annotated[float, Field(gt=0.0, le=1.0, description="kept fraction of the entries, per tensor")]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1, description="random seed")]
Gamma = Annotated[float, Field(ge=0.0, lt=1.0, description="fraction of the largest magnitudes dropped as outliers")]
Rescale = Annotated[StrictBool, Field(description="divide kept entries by density")]
SignMethod = Annotated[Literal["total", "frequency"], Field(description="elect by the sum of values or by sign counts")]
SignSource = Annotated[Literal["weighted", "unweighted"],
                       Field(description="voters are w_i*tau_i (mergekit) or tau_i (PEFT)")]
Normalize = Annotated[Literal["weight", "count", "none"],
                      Field(description="divide by the agreeing weights, count, or not at all")]
Ratio = Annotated[float, Field(gt=0.0, le=1.0, description="kept fraction of the balanced scores")]
Values = Annotated[Literal["exact", "sign"],
                   Field(description="kept values as stored ('exact', fp16) or sign * one scale per tensor ('sign': "
                                     "mean |kept|, BitDelta's scale on the support; stored with the sign_ef codec)")]
