//! Reading rows of our own queries through SPI. A column that cannot be NULL (NOT NULL in
//! sql/registry.sql, pgmq's NOT NULL columns, values computed from such) is read with `required`:
//! a NULL there means the registry or a queue was changed by hand, and turning it into "" or 0
//! (an owner of InvalidOid, an empty queue name) would act on the wrong thing instead of stopping.

use pgrx::datum::{FromDatum, IntoDatum};
use pgrx::spi::{SpiHeapTupleData, SpiTupleTable};

use crate::error::SidecarError;

/// A row of an SPI result: an iterated tuple, or a table positioned on its row (`.first()`).
pub trait Row {
    fn column<T: FromDatum + IntoDatum>(&self, i: usize) -> pgrx::spi::Result<Option<T>>;
}

impl Row for SpiHeapTupleData<'_> {
    fn column<T: FromDatum + IntoDatum>(&self, i: usize) -> pgrx::spi::Result<Option<T>> {
        self.get(i)
    }
}

impl Row for SpiTupleTable<'_> {
    fn column<T: FromDatum + IntoDatum>(&self, i: usize) -> pgrx::spi::Result<Option<T>> {
        self.get(i)
    }
}

/// Column `i` (1-based) of `row`, which our query never makes NULL; `what` names it for the error.
pub fn required<T: FromDatum + IntoDatum>(row: &impl Row, i: usize, what: &str) -> Result<T, SidecarError> {
    row.column::<T>(i)?.ok_or_else(|| SidecarError::Corrupt(format!("{what} is NULL")))
}
