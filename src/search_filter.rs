//! The one check a search's filter needs before it is spliced into a query: that it is exactly
//! one expression. sql/search.sql places it as `WHERE (<filter>` + newline + `)` inside a
//! sub-select of the source; the caller's own rights and search path apply to it, so it can do
//! nothing the caller could not do with a plain SELECT. But text that closes the parenthesis
//! itself (`true) UNION SELECT ...`, `true), (1`) would change the shape of our statement around
//! it, and an error from that would be ours to explain. So the filter is parsed alone, as
//! `SELECT (<filter>` + newline + `)`, and must come out as one plain target: the same tokens in
//! the same parentheses are then one expression in the search's WHERE too. (The newline ends a
//! `--` comment inside the filter before our closing parenthesis, in both places.)

use pgrx::prelude::*;

use crate::error::SidecarError;

fn not_one_expression() -> ! {
    SidecarError::Refused {
        code: PgSqlErrorCode::ERRCODE_SYNTAX_ERROR,
        message: "a search filter must be one boolean expression over the table's columns".into(),
        hint: "e.g. filter => 'tenant = 7 AND section = ''python''': no semicolons, unbalanced parentheses, FROM or UNION.",
    }
    .report()
}

/// Whether `list` holds no element (NIL).
fn empty(list: *mut pg_sys::List) -> bool {
    list.is_null()
}

#[pg_schema]
mod embed_sidecar {
    use pgrx::prelude::*;

    use super::{empty, not_one_expression};

    /// Refuses a filter that is not exactly one expression (see the module comment); returns the
    /// filter, so a query can check and use it in one call.
    #[pg_extern(immutable, strict, parallel_safe, name = "_check_filter")]
    fn check_filter(filter: &str) -> String {
        let Ok(sql) = std::ffi::CString::new(format!("SELECT ({filter}\n)")) else { not_one_expression() };
        // SAFETY: raw_parser reads a NUL-terminated string and returns a List of RawStmt nodes in
        // the current memory context; a syntax error is raised as an ERROR (the guard pgrx puts
        // around pg_sys calls turns it into a Rust unwind and back into the ERROR). Each node is
        // read only after its tag says what it is.
        let one_expression = unsafe {
            let stmts = pg_sys::raw_parser(sql.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
            if stmts.is_null() || (*stmts).length != 1 {
                false
            } else {
                let raw = pg_sys::list_nth(stmts, 0) as *mut pg_sys::RawStmt;
                let node = (*raw).stmt;
                if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_SelectStmt {
                    false
                } else {
                    let select = &*(node as *mut pg_sys::SelectStmt);
                    select.op == pg_sys::SetOperation::SETOP_NONE
                        && !select.targetList.is_null()
                        && (*select.targetList).length == 1
                        && empty(select.distinctClause)
                        && select.intoClause.is_null()
                        && empty(select.fromClause)
                        && select.whereClause.is_null()
                        && empty(select.groupClause)
                        && select.havingClause.is_null()
                        && empty(select.windowClause)
                        && empty(select.valuesLists)
                        && empty(select.sortClause)
                        && select.limitOffset.is_null()
                        && select.limitCount.is_null()
                        && empty(select.lockingClause)
                        && select.withClause.is_null()
                }
            }
        };
        if !one_expression {
            not_one_expression()
        }
        filter.to_string()
    }
}
