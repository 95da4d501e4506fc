"""A stored point's payload as the public product view: the one place that defines the wire format."""

from __future__ import annotations

from collections.abc import Callable

from schemas.payload import Product

# (retailer, product id, photo index, stored ref) -> the URL a client should load the photo from.
ImageUrl = Callable[[str, str, int, str], str]


def ref_as_url(retailer: str, product_id: str, index: int, ref: str) -> str:
    return ref


def to_product(payload: dict[str, object], image_url: ImageUrl = ref_as_url) -> Product:
    """Map a stored payload to the public product view (the one place that defines the wire format)."""
    retailer, product_id = str(payload["retailer"]), str(payload["product_id"])
    images = payload.get("images")
    refs = [str(ref) for ref in images] if isinstance(images, list) else []
    return Product.model_validate(
        {
            **{k: v for k, v in payload.items() if k in Product.model_fields},
            "id": product_id,
            "image_urls": [image_url(retailer, product_id, i, ref) for i, ref in enumerate(refs)],
        }
    )
