//! The glyph mixture of DESIGN.md section 6 (being written).
