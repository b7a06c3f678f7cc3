//! `#[derive(TypeTag)]` for whispeer: the type's wire tag from
//! `#[whispeer(type = "myapp.MyData/v1")]` (re-exported as `whispeer::TypeTag`).
#![forbid(unsafe_code)]

use proc_macro::TokenStream;
use quote::quote;
use syn::{parse_macro_input, DeriveInput, LitStr};

/// Implements `whispeer::TypeTag` with the tag given by `#[whispeer(type = "...")]`.
#[proc_macro_derive(TypeTag, attributes(whispeer))]
pub fn derive_type_tag(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match tag_of(&input) {
        Ok(tag) => {
            let name = &input.ident;
            let (imp, ty, wh) = input.generics.split_for_impl();
            quote! {
                impl #imp ::whispeer::TypeTag for #name #ty #wh {
                    const TAG: &'static str = #tag;
                }
            }
            .into()
        }
        Err(e) => e.to_compile_error().into(),
    }
}

fn tag_of(input: &DeriveInput) -> syn::Result<LitStr> {
    let mut found = None;
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("whispeer")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("type") {
                let lit: LitStr = meta.value()?.parse()?;
                let v = lit.value();
                if v.is_empty()
                    || v.len() > 128
                    || v.chars()
                        .any(|c| !c.is_ascii_graphic() || c == '"' || c == '\\')
                {
                    return Err(meta.error(
                        "a type tag is 1 to 128 printable ASCII characters without quotes, \
                         backslashes or spaces",
                    ));
                }
                found = Some(lit);
                Ok(())
            } else {
                Err(meta.error("expected `type = \"...\"`"))
            }
        })?;
    }
    found.ok_or_else(|| {
        syn::Error::new_spanned(
            &input.ident,
            "#[derive(TypeTag)] needs #[whispeer(type = \"myapp.MyData/v1\")]",
        )
    })
}
