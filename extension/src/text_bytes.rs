//! `text` arguments read as bytes. pgrx turns a `text` argument into `&str` by checking UTF-8 and
//! panicking when the check fails, which a `SQL_ASCII` database allows (any bytes are text there).
//! Functions that take outside input read it as `TextBytes` instead and decide for themselves:
//! a webhook with such a body is `rejected`, a checkout argument raises 22023.

use pgrx::callconv::{Arg, ArgAbi};
use pgrx::impl_sql_translatable;
use pgrx::nullable::Nullable;

/// The bytes of a `text` argument, exactly as stored (no encoding check, no copy).
#[derive(Clone, Copy)]
pub struct TextBytes<'a>(pub &'a [u8]);

impl<'a> TextBytes<'a> {
    /// The text as UTF-8, or `None` when it is not.
    pub fn as_utf8(self) -> Option<&'a str> {
        std::str::from_utf8(self.0).ok()
    }
}

impl_sql_translatable!(TextBytes<'_>, arg_only = "text");

// SAFETY: a `text` datum is a varlena, which is exactly what pgrx unboxes `&[u8]` from (it reads
// the varlena's length and data and checks nothing about the bytes). The SQL type above is `text`,
// so Postgres hands these functions nothing else.
unsafe impl<'fcx> ArgAbi<'fcx> for TextBytes<'fcx> {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        // SAFETY: see the impl's note; the caller guarantees a non-null argument.
        TextBytes(unsafe { <&'fcx [u8] as ArgAbi<'fcx>>::unbox_arg_unchecked(arg) })
    }

    unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<Self> {
        // SAFETY: as above; a null argument stays null.
        unsafe { <&'fcx [u8] as ArgAbi<'fcx>>::unbox_nullable_arg(arg) }.map(TextBytes)
    }
}
