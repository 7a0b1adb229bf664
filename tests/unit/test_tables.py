from purifier.tables import html_table, markdown_table, text_table


def test_text_table_pads_every_column():
    assert text_table(["a", "long"], [["xyz", 1], ["q", 2.5]]).split("\n") == [
        "a    long", "---  ----", "xyz  1   ", "q    2.5 "]


def test_markdown_table():
    assert markdown_table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"


def test_html_table_escapes_and_puts_notes_on_a_second_line():
    html = html_table(["<a>"], [[("1 & 2", "note <b>")]], "headline")
    assert html == ('<table class="headline"><thead><tr><th>&lt;a&gt;</th></tr></thead><tbody>'
                    "<tr><td>1 &amp; 2<br><small>note &lt;b&gt;</small></td></tr></tbody></table>")
